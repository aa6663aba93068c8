"""diffusers' conventions: loading through `AutoModel` with remote code, tiling, slicing, temporal chunking,
the output classes, the latent normalisation filled from an encoded data set, and the diffusion example."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoModel
from diffusers.models.autoencoders.vae import DecoderOutput
from safetensors import safe_open

from cmvae import CrossModalVAE, load_model, save_model
from cmvae.checkpoints import DEFAULT_MODEL_DIR
from cmvae.cli import main
from cmvae.datasets import list_items
from cmvae.encode_dataset import encode_dataset, write_latent_stats
from cmvae.pipeline import PipelineSettings, VideoPipeline

from fresh_process import run_child
from media import sample_clip

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().parent / "run_model_decode.py"


def _video(seed: int = 0, frames: int = 8, size: int = 32) -> torch.Tensor:
    return torch.rand((1, 3, frames, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _outputs(model: CrossModalVAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        z = model.encode(x.to(model.dtype)).latent_dist.mode()
        return z.float(), model.decode(z).sample.float()


# ---- loading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_saved_folder_loads_through_automodel_with_the_same_outputs(tmp_path, dtype):
    torch.manual_seed(0)
    CrossModalVAE.from_preset("tiny").save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "autoencoder.CrossModalVAE"}
    assert (tmp_path / "model" / "autoencoder.py").is_file()
    through_diffusers = AutoModel.from_pretrained(str(tmp_path / "model"), trust_remote_code=True, torch_dtype=dtype)
    ours = CrossModalVAE.from_pretrained(tmp_path / "model", torch_dtype=dtype)
    assert type(through_diffusers) is CrossModalVAE and through_diffusers.dtype == dtype
    x = _video()
    for a, b in zip(_outputs(through_diffusers, x), _outputs(ours, x)):
        assert torch.equal(a, b)


def test_without_trusting_remote_code_automodel_refuses(tmp_path):
    CrossModalVAE.from_preset("tiny").save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModel.from_pretrained(str(tmp_path / "model"))


def test_folders_of_save_model_and_convert_load_through_automodel(tmp_path, capsys):
    torch.manual_seed(1)
    model = CrossModalVAE.from_preset("tiny")
    saved = save_model(model, tmp_path / "saved")
    assert "autoencoder.py" in json.loads((saved / "config.json").read_text())["_cmvae_files"]
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    assert main(["convert", str(tmp_path / "weights.pt"), "-o", str(tmp_path / "converted")]) == 0
    x = _video(2)
    expected = _outputs(model.eval(), x)
    for folder in (saved, tmp_path / "converted"):
        loaded = AutoModel.from_pretrained(str(folder), trust_remote_code=True)
        for a, b in zip(_outputs(loaded, x), expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_shipped_model_loads_through_automodel():
    ours = load_model("default")
    through_diffusers = AutoModel.from_pretrained(str(DEFAULT_MODEL_DIR), trust_remote_code=True)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), through_diffusers.state_dict().values()))
    assert ours.config.latents_mean is not None and len(ours.config.latents_std) == ours.config.latent_channels


def test_a_text_model_decodes_without_captions_with_the_empty_caption():
    """diffusers pipelines call `decode(z)`; the config names the encoder, which gives the empty caption."""
    torch.manual_seed(0)
    model = CrossModalVAE.from_preset("tiny-text").eval()
    assert model.config.text_encoder_name == "minilm"
    z = torch.randn(1, 16, 1, 4, 4)
    with torch.no_grad():
        default = model.decode(z, image_mode=False).sample
        assert model.text_encoder is not None  # loaded from the config's name on first use
        empty = model.decode(z, image_mode=False, captions="").sample
        other = model.decode(z, image_mode=False, captions="a red car on a wet road").sample
    assert torch.equal(default, empty)
    assert not torch.allclose(default, other)


def test_a_text_model_whose_config_names_no_encoder_says_what_to_pass():
    model = CrossModalVAE.from_preset("small-4z-text")
    with pytest.raises(ValueError, match="context="):
        model.decode(torch.randn(1, 4, 1, 2, 2))


# ---- conventions -----------------------------------------------------------------------------------


def test_compression_ratios_and_output_classes():
    model = CrossModalVAE.from_preset("tiny").eval()
    assert (model.spatial_compression_ratio, model.temporal_compression_ratio) == (8, 4)
    with torch.no_grad():
        out = model.decode(torch.randn(1, 16, 2, 4, 4))
    assert isinstance(out, DecoderOutput) and out.sample.shape == (1, 3, 8, 32, 32)


def test_slicing_gives_the_batched_output():
    torch.manual_seed(0)
    model = CrossModalVAE.from_preset("tiny").eval()
    x = torch.cat([_video(3), _video(4)])
    whole = _outputs(model, x)
    model.enable_slicing()
    sliced = _outputs(model, x)
    model.disable_slicing()
    for a, b in zip(whole, sliced):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # batched convolutions round differently


def test_temporal_chunking_is_off_by_default_and_approximate_when_on():
    torch.manual_seed(0)
    model = CrossModalVAE.from_preset("tiny").eval()
    z = torch.randn(1, 16, 6, 4, 4)
    with torch.no_grad():
        whole = model.decode(z).sample
        model.enable_temporal_chunking(chunk_frames=8, overlap=4)
        chunked = model.decode(z).sample
        model.enable_temporal_chunking(chunk_frames=24, overlap=0)  # one chunk: the whole video
        single = model.decode(z).sample
        model.disable_temporal_chunking()
    assert chunked.shape == whole.shape == (1, 3, 24, 32, 32)
    assert torch.isfinite(chunked).all() and not torch.equal(chunked, whole)
    assert torch.equal(single, whole)
    with pytest.raises(ValueError, match="multiple of 4"):
        model.enable_temporal_chunking(chunk_frames=6)


def test_tiling_with_a_memory_budget_gives_the_untiled_output():
    """A budget of 1 byte: every level in tiles, exactly."""
    torch.manual_seed(0)
    model = CrossModalVAE.from_preset("tiny").eval()
    z = torch.randn(1, 16, 1, 12, 12)
    with torch.no_grad():
        untiled = model.decode(z).sample
        model.enable_tiling(max_memory=1)
        tiled = model.decode(z).sample
        model.disable_tiling()
    torch.testing.assert_close(tiled, untiled, atol=1e-4, rtol=0)


def _fresh_decode(tiling: dict | None, output: Path) -> dict:
    spec = {"latent": [1, 16, 1, 48, 48], "tiling": tiling, "output": str(output)}
    return run_child(CHILD, spec)


def test_tiling_decodes_as_untiled_on_far_less_memory(tmp_path):
    """A 48x48 latent (384x384 frames) decoded in a fresh process, whole and in tiles of 64 pixels: the same
    frames, and the decode's own peak (the process's peak resident set above what it held before decoding) at
    least 30% lower. (32x32 fell to a 99 MB untiled working set once bfloat16 GroupNorm stopped copying.)"""
    untiled = _fresh_decode(None, tmp_path / "untiled.npy")
    tiled = _fresh_decode({"tile_sample_min_size": 64, "tile_overlap": 32}, tmp_path / "tiled.npy")
    np.testing.assert_allclose(np.load(tmp_path / "tiled.npy"), np.load(tmp_path / "untiled.npy"), atol=1e-4)
    untiled_work, tiled_work = untiled["peak"] - untiled["before"], tiled["peak"] - tiled["before"]
    assert untiled_work > 100e6, untiled  # large enough for the measurement to mean something
    assert tiled_work < 0.7 * untiled_work, (tiled, untiled)


# ---- latent normalisation --------------------------------------------------------------------------


def test_normalised_latents_of_an_encoded_data_set_are_standard(tmp_path, capsys):
    """encode-dataset's statistics, put into a model folder with `cmvae convert --latent-stats`, normalise that
    data set's latents to mean 0 and std 1 per channel."""
    clips = tmp_path / "clips"
    clips.mkdir()
    for i, name in enumerate(["bigbuckbunny", "bikes", "carphone"]):
        sample_clip(name, 8, clips / f"{i}.mp4", crop=(48, 64))
    vae = load_model("default")
    pipe = VideoPipeline(vae, PipelineSettings(device="cpu", dtype="float32"))
    encode_dataset(pipe, list_items(clips), tmp_path / "latents", progress=False)
    stats_file = write_latent_stats(tmp_path / "latents")
    folder = tmp_path / "with-stats"
    assert main(["convert", str(DEFAULT_MODEL_DIR), "-o", str(folder), "--latent-stats",
                 str(stats_file)]) == 0
    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True)
    latents = []
    for shard in (tmp_path / "latents").glob("shard-*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            latents += [handle.get_tensor(k) for k in handle.keys() if k.endswith(".latent")]
    normalised = model.normalize_latents(torch.stack(latents).double())
    per_channel = normalised.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 0.05
    std = per_channel.std(1, correction=0)
    assert std.min() > 0.95 and std.max() < 1.05
    torch.testing.assert_close(model.denormalize_latents(normalised), torch.stack(latents).double())


def test_convert_refuses_statistics_of_another_width(tmp_path, capsys):
    (tmp_path / "stats.json").write_text(json.dumps({"mean": [0.0] * 4, "std": [1.0] * 4, "scaling_factor": 1.0,
                                                     "items": 1, "values_per_channel": 8}))
    model = save_model(CrossModalVAE.from_preset("tiny"), tmp_path / "tiny")
    code = main(["convert", str(model), "-o", str(tmp_path / "out"), "--latent-stats", str(tmp_path / "stats.json")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and "latents_mean needs one value per latent channel (16)" in err
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_file_that_is_not_latent_statistics(tmp_path, capsys):
    (tmp_path / "stats.json").write_text("[1, 2]")
    model = save_model(CrossModalVAE.from_preset("tiny"), tmp_path / "tiny")
    code = main(["convert", str(model), "-o", str(tmp_path / "out"), "--latent-stats", str(tmp_path / "stats.json")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and "not a latent_stats.json" in err


# ---- the diffusion example -------------------------------------------------------------------------


def test_the_latent_diffusion_example_runs_end_to_end(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import latent_diffusion
    finally:
        sys.path.remove(str(ROOT / "examples"))
    settings = latent_diffusion.Settings(clips=2, frames=8, size=32, steps=2, sample_steps=2)
    results = latent_diffusion.run(tmp_path, settings)
    assert results.latent_shape == [2, 16, 2, 4, 4]
    values = [results.first_loss, results.final_loss, *results.sample_psnr, *results.reconstruction_psnr]
    assert len(values) == 6 and all(np.isfinite(values)), results
    assert (tmp_path / "strip.png").stat().st_size > 0
