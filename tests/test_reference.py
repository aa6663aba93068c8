"""The network against the authors' implementation: reference outputs, per-layer probes and the
released checkpoints' key manifests (../shared/reference)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from cmvae import CMVAEConfig, CrossModalVAE, preset
from cmvae.checkpoints import infer_config, load_model, model_from_state_dict

TOLERANCE = 1e-4
SMALL = {"small_16z": "small-16z", "small_4z_text": "small-4z-text"}
RELEASED = {"4z": "4z", "4z_text": "4z-text", "16z": "16z", "16z_text": "16z-text"}


def _text_kwargs(io: dict) -> dict:
    return {"context": io["context"], "context_mask": io["context_mask"]} if "context" in io else {}


def run_with_probes(model: CrossModalVAE, io: dict) -> dict[str, torch.Tensor]:
    """Run the video encode and decode through the public API, recording every probed module's
    first input and output, then the image path. Each decode starts from the reference latent, as
    the reference did, so that a decoder layer is compared on the same input."""
    wanted = {k[len("probe."):].rsplit(".", 1)[0] for k in io if k.startswith("probe.")}
    modules = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, output):
            got.setdefault(f"probe.{name}.input", args[0].detach().clone())
            got.setdefault(f"probe.{name}.output", output.detach().clone())
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in sorted(wanted)]
    text = _text_kwargs(io)
    with torch.no_grad():
        posterior = model.encode(io["video"], **text).latent_dist
        got["temporal_moments"] = posterior.parameters
        got["latent"] = posterior.mode()
        got["reconstruction"] = model.decode(io["latent"], **text).sample
        for handle in handles:
            handle.remove()
        context = model.text_context(1, **text)
        got["spatial_moments"] = model.encode_spatial(io["video"], context).parameters
        got["image_latent"] = model.encode(io["image"], **text).latent_dist.mode()
        got["image_reconstruction"] = model.decode(io["image_latent"], **text).sample
    return got


def assert_matches_reference(model: CrossModalVAE, io: dict) -> None:
    got = run_with_probes(model, io)
    expected = {k: v for k, v in io.items() if k not in ("video", "image", "context", "context_mask")}
    assert set(expected) <= set(got), f"not produced: {sorted(set(expected) - set(got))}"
    errors = {k: (got[k] - expected[k]).abs().max().item() for k in expected}
    assert all(got[k].shape == expected[k].shape for k in expected)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{worst} differs by {errors[worst]:.3g}"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_reference_model_reproduces_every_tensor(reference_dir, name):
    model = load_model(reference_dir / f"{name}_weights.safetensors", config=SMALL[name])
    io = load_file(reference_dir / f"{name}_io.safetensors")
    assert len([k for k in io if k.startswith("probe.")]) >= 10
    assert_matches_reference(model, io)


def test_small_model_without_text_infers_its_config(reference_dir):
    state = load_file(reference_dir / "small_16z_weights.safetensors")
    assert infer_config(state) == preset("small-16z")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_presets_match_reference_configs(reference_dir, name):
    ref = json.loads((reference_dir / f"{name}_config.json").read_text())
    cfg = preset(SMALL[name])
    assert cfg.latent_channels == ref["z_channels"]
    assert cfg.use_quant_conv == ref["use_quant_conv"]
    assert cfg.base_channels == ref["ch"]
    assert list(cfg.channel_multipliers) == ref["ch_mult"]
    assert cfg.num_res_blocks == ref["num_res_blocks"]
    assert cfg.temporal_channels == ref["temporal_hidden_channels"]
    assert cfg.temporal_compression == ref["temporal_scale_factor"]
    assert cfg.max_relative_position == ref["max_temporal_length"]
    assert cfg.context_dim == ref["context_dim"]
    if ref["text"]:
        assert cfg.cross_attention_heads == ref["cross_attention_heads"]
        assert cfg.cross_attention_head_dim == ref["cross_attention_head_dim"]
        assert list(cfg.cross_attention_patch_sizes) == ref["encoder_patch_sizes"]
        assert list(reversed(cfg.cross_attention_patch_sizes)) == ref["decoder_patch_sizes_from_lowest"]


def _manifest(reference_dir, name) -> dict:
    return json.loads((reference_dir / f"manifest_{name}.json").read_text())


def _unused_conv3_tmp(shapes: dict[str, list[int]]) -> set[str]:
    """conv3_tmp keys of blocks without nin_shortcut (width kept): the forward never uses them."""
    unused = set()
    for key in shapes:
        match = re.match(r"^(.*)\.conv3_tmp\.", key)
        if match and f"{match.group(1)}.nin_shortcut.weight" not in shapes:
            unused.add(key)
    return unused


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_presets_accept_exactly_the_manifest(reference_dir, name):
    manifest = _manifest(reference_dir, name)
    shapes = manifest["state_dict"]
    unused = _unused_conv3_tmp(shapes)
    assert unused, "the released checkpoints hold unused conv3_tmp layers"
    with torch.device("meta"):
        model = CrossModalVAE.from_preset(RELEASED[name])
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = {k: v for k, v in shapes.items() if k not in unused}
    assert own == expected
    unused_params = sum(torch.Size(shapes[k]).numel() for k in unused)
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"] - unused_params


def test_state_dict_of_16z_text_shapes_loads_with_inferred_config(reference_dir, tmp_path):
    shapes = _manifest(reference_dir, "16z_text")["state_dict"]
    # One stored value per tensor, broadcast to the full shape: the file stays small.
    state = {k: torch.full((1,), 0.01, dtype=torch.float16).expand(v) for k, v in shapes.items()}
    state["loss.discriminator.main.0.weight"] = torch.zeros(3)
    path = tmp_path / "sota-4-16z-text.ckpt"
    torch.save({"state_dict": state, "global_step": 1000, "epoch": 3}, path)
    model = load_model(path)
    assert model.cfg == preset("16z-text")
    assert set(model.load_report.skipped_unused) == _unused_conv3_tmp(shapes)
    assert next(model.parameters()).dtype == torch.float32


def test_config_defaults_are_the_released_16z():
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(CrossModalVAE.__init__).parameters.items()
                if name != "self"}
    assert CMVAEConfig(**defaults) == CMVAEConfig() == preset("16z")


def test_model_from_state_dict_rejects_unknown_width(reference_dir):
    state = load_file(reference_dir / "small_4z_text_weights.safetensors")
    with pytest.raises(ValueError, match="512"):
        model_from_state_dict(state)
