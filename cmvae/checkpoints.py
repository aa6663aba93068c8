"""Loading and saving: the authors' Lightning checkpoints, plain state dicts and our own model folders."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .files import install_folder, refuse_overwriting_input, staging_folder, sweep_stale_staging, usual_mode
from .models import PRESETS, CMVAEConfig, CrossModalVAE, preset

logger = logging.getLogger(__name__)

STATE_DICT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
_UNUSED_TEMPORAL = re.compile(r"^(.*\.(?:block\.\d+|block_1|block_2))\.conv3_tmp\.")


class CheckpointError(ValueError):
    """A weights file or folder that cannot be loaded as a Cross-modal Video VAE."""


@dataclass
class LoadReport:
    """What a load did beyond copying weights: which released tensors it skipped on purpose."""

    skipped_unused: list[str] = field(default_factory=list)
    skipped_unused_params: int = 0

    def describe(self) -> str:
        if not self.skipped_unused:
            return "all tensors loaded"
        return (f"skipped {len(self.skipped_unused)} unused conv3_tmp tensors ({self.skipped_unused_params:,} "
                "parameters) of residual blocks that keep their width; the forward pass never uses them")


ConfigLike = CMVAEConfig | str | dict | os.PathLike | None


def resolve_config(config: ConfigLike) -> CMVAEConfig | None:
    """A config from a `CMVAEConfig`, a preset name, a dict of fields, or a JSON file of fields."""
    if config is None or isinstance(config, CMVAEConfig):
        return config
    if isinstance(config, dict):
        return CMVAEConfig.from_dict(config)
    if isinstance(config, str) and not config.endswith(".json"):
        return preset(config)
    path = Path(config)
    if not path.is_file():
        raise CheckpointError(f"config file not found: {path}")
    values = json.loads(path.read_text())
    return CMVAEConfig.from_dict({k: v for k, v in values.items() if not k.startswith("_")})


# ---- reading files --------------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights in a `.ckpt` (Lightning: under "state_dict", `loss.*` dropped), `.pt`, `.pth`,
    `.bin` or `.safetensors` file. Pickles load with `weights_only=True`: they can never run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            state = load_file(path)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
    else:
        state = _load_pickle(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path} holds no state dict (expected a mapping of names to tensors)")
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: entries that are not tensors: {_some(not_tensors)}")
    return state


def _load_pickle(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):  # files in the legacy (non-zip) format cannot be memory-mapped
            raise _unreadable(path, error) from None
    except Exception as error:  # noqa: BLE001 - a corrupt pickle raises many kinds of errors
        raise _unreadable(path, error) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise _unreadable(path, error) from None


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    """Tell a file that needs arbitrary Python objects (refused) from a damaged one."""
    lines = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported global" in line]
    if isinstance(error, pickle.UnpicklingError) and lines:
        return CheckpointError(
            f"refused to load {path}: it holds Python objects other than tensors and plain containers, and "
            f"unpickling those could run code ({lines[0]}). If you trust the file's origin, extract its weights "
            "once with torch.load(path, weights_only=False)['state_dict'] and save them with safetensors."
        )
    return CheckpointError(f"{path} is not a readable PyTorch checkpoint: the file is damaged or of another kind "
                           f"({type(error).__name__})")


def _some(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---- configuration from keys ----------------------------------------------------------------------


def infer_config(state: dict[str, torch.Tensor]) -> CMVAEConfig:
    """The configuration that a released-format state dict was made with, read off its keys and shapes."""
    try:
        return _infer_config(state)
    except KeyError as error:
        raise CheckpointError(f"not a Cross-modal Video VAE state dict: no key {error.args[0]!r}") from None


def _count(state: dict, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state if (m := regex.match(k))})


def _infer_config(state: dict[str, torch.Tensor]) -> CMVAEConfig:
    base, in_channels = state["encoder.conv_in.weight"].shape[:2]
    levels = _count(state, r"^encoder\.down\.(\d+)\.")
    widths = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    values = dict(
        in_channels=in_channels,
        latent_channels=state["decoder.conv_in.weight"].shape[1],
        use_quant_conv="quant_conv.weight" in state,
        base_channels=base,
        channel_multipliers=tuple(w // base for w in widths),
        num_res_blocks=_count(state, r"^encoder\.down\.0\.block\.(\d+)\."),
        temporal_channels=state["encoder_temporal.conv_in.conv.weight"].shape[0],
        temporal_compression=2 ** _count(state, r"^encoder_temporal\.mid_blocks\.(\d+)\."),
        max_relative_position=(state["encoder.mid.attn_1_tmp.relative_position_k.embeddings_table"].shape[0] - 1) // 2,
    )
    if "encoder.down.0.attn.0.to_k.weight" in state:
        values.update(_infer_text(state, widths))
    return CMVAEConfig(**values)


def _infer_text(state: dict[str, torch.Tensor], widths: list[int]) -> dict:
    inner, context_dim = state["encoder.down.0.attn.0.to_k.weight"].shape
    if inner != 512:
        raise CheckpointError(
            f"the cross-attention is {inner} wide; only 512 (the released 8 heads of 64) can be read off the "
            "weights: pass a config with cross_attention_heads and cross_attention_head_dim"
        )
    patch_sizes = []
    for level, width in enumerate(widths):
        features = state[f"encoder.down.{level}.attn.0.norm.weight"].shape[0]
        patch_sizes.append(math.isqrt(features // width))
    return dict(context_dim=context_dim, cross_attention_heads=8, cross_attention_head_dim=64,
                cross_attention_patch_sizes=tuple(patch_sizes),
                text_encoder_name="google/flan-t5-large" if context_dim == 1024 else None)


# ---- strict loading -------------------------------------------------------------------------------


def split_unused(model: CrossModalVAE, state: dict[str, torch.Tensor]) -> tuple[dict, LoadReport]:
    """Remove the released `conv3_tmp` tensors of blocks that keep their width (never used)."""
    own = model.state_dict(keep_vars=True)
    kept, report = {}, LoadReport()
    for key, tensor in state.items():
        match = _UNUSED_TEMPORAL.match(key)
        if match and key not in own and f"{match.group(1)}.conv1.weight" in own:
            report.skipped_unused.append(key)
            report.skipped_unused_params += tensor.numel()
        else:
            kept[key] = tensor
    return kept, report


def load_weights(model: CrossModalVAE, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 assign: bool = False) -> LoadReport:
    """Copy `state` into `model`, refusing any missing, unexpected or mis-shaped key by name.

    With `assign` the tensors replace the parameters (for a model built on the `meta` device).
    """
    state, report = split_unused(model, state)
    own = model.state_dict(keep_vars=True)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = [f"{k} {tuple(state[k].shape)} (model: {tuple(own[k].shape)})"
                 for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_some(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_some(misshaped)}")
    if problems:
        raise CheckpointError("weights do not fit this configuration; " + "; ".join(problems))
    converted = {k: v.to(dtype=dtype).contiguous() for k, v in state.items()}
    model.load_state_dict(converted, strict=True, assign=assign)
    if report.skipped_unused:
        logger.info(report.describe())
    return report


def model_from_state_dict(state: dict[str, torch.Tensor], config: ConfigLike = None,
                          dtype: torch.dtype = torch.float32) -> tuple[CrossModalVAE, LoadReport]:
    """Build the model for `state` (its config given or inferred) on the meta device and assign the weights."""
    cfg = resolve_config(config) or infer_config(state)
    with torch.device("meta"):
        model = CrossModalVAE.from_cmvae_config(cfg)
    report = load_weights(model, state, dtype=dtype, assign=True)
    return model.eval(), report


def load_model(path: str | os.PathLike, config: ConfigLike = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> CrossModalVAE:
    """Load a model from a folder written by `save_pretrained` or a weights file of any supported kind.

    For a weights file the configuration is read off its keys unless given (a preset name, a
    `CMVAEConfig`, a dict or a JSON file). `default` is the model shipped with cmvae, as on the
    command line.
    """
    path = _shipped_model_folder() if str(path) == "default" else Path(path)
    if path.is_dir():
        if config is not None:
            raise CheckpointError(f"{path} is a model folder with its own config.json; do not pass a config")
        model = load_pretrained(path, dtype)
    elif path.suffix in STATE_DICT_SUFFIXES:
        model, report = model_from_state_dict(read_state_dict(path), config, dtype=dtype)
        model.load_report = report
    elif not path.exists():
        raise CheckpointError(f"no model at {path}: expected a model folder or a weights file")
    else:
        raise CheckpointError(f"{path}: unsupported weights file; expected one of {', '.join(STATE_DICT_SUFFIXES)}")
    return model.to(device=device).eval()


DEFAULT_MODEL_DIR = Path(__file__).parent / "weights" / "default"


def resolve_model(spec: str | os.PathLike = "default", config: ConfigLike = None,
                  dtype: torch.dtype = torch.float32) -> CrossModalVAE:
    """A model from `default` (the shipped model), a model folder or weights file, or a preset name
    (fresh random weights: for benchmarks and tests)."""
    if str(spec) == "default":
        return load_model("default", dtype=dtype)
    path = Path(spec)
    if path.exists():
        return load_model(path, config=config, dtype=dtype)
    if str(spec) in PRESETS:
        logger.warning("model %r is a preset: random weights, the output will not resemble the input", str(spec))
        return CrossModalVAE.from_preset(str(spec))
    raise CheckpointError(f"no model at {spec}: not a file, a folder or a preset name ({', '.join(PRESETS)})")


def _shipped_model_folder() -> Path:
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise CheckpointError("this installation ships no default model; pass --model with a model folder, "
                              "a checkpoint or a preset name")
    return DEFAULT_MODEL_DIR


def load_pretrained(folder: Path, dtype: torch.dtype = torch.float32) -> CrossModalVAE:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a model folder: it has no config.json")
    try:
        return CrossModalVAE.from_pretrained(folder, torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError, TypeError, RuntimeError) as error:  # TypeError: a value of the wrong type
        raise CheckpointError(f"cannot load the model folder {folder}: {error}") from None


MODEL_FILES_KEY = "_cmvae_files"  # in config.json: the files of a model folder that cmvae wrote


def save_model(model: CrossModalVAE, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """`save_pretrained` into a temporary folder, then put it in place: never a half-written folder.

    A folder that exists must be empty, or a model folder that cmvae wrote and `overwrite` given;
    then only the files cmvae wrote there are replaced, and the user's other files stay."""
    folder = Path(os.path.abspath(folder))
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} exists and is not a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(folder)  # what a killed save left there does not make the folder the user's
    replaced = _replaceable_files(folder, overwrite)
    with staging_folder(folder) as staging:
        model.save_pretrained(staging)
        _mark_as_ours(staging)
        install_folder(staging, folder, replaced)
    return folder


def _replaceable_files(folder: Path, overwrite: bool) -> list[str]:
    """The files of `folder` that saving a model there may replace; raises where it may not write."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return []
    owned = _files_we_wrote(folder)
    if owned is None:
        raise CheckpointError(f"{folder} exists, is not empty and is not a model folder written by cmvae; "
                              "choose a new folder (nothing was written)")
    if not overwrite:
        raise CheckpointError(f"{folder} holds a model written by cmvae; pass --overwrite to replace it (only its "
                              f"{', '.join(owned)} are replaced)")
    return owned


MODEL_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]


def _files_we_wrote(folder: Path) -> list[str] | None:
    """The files cmvae wrote in a model folder, as its config.json lists them; a folder from before that
    list existed counts only when it holds nothing but a CrossModalVAE's two files."""
    try:
        values = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(values, dict):
        return None
    files = values.get(MODEL_FILES_KEY)
    if files is None and values.get("_class_name") == "CrossModalVAE":
        return MODEL_FILES if sorted(p.name for p in folder.iterdir()) == MODEL_FILES else None
    if not isinstance(files, list) or not all(_plain_file_name(f) for f in files):
        return None
    return files


def _plain_file_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def _mark_as_ours(staging: Path) -> None:
    """List the files in config.json (what a later `overwrite` may replace), with the usual permissions."""
    config_path = staging / "config.json"
    values = json.loads(config_path.read_text(encoding="utf-8"))
    values[MODEL_FILES_KEY] = sorted(p.name for p in staging.iterdir())
    config_path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for path in staging.iterdir():
        os.chmod(path, usual_mode())


def convert_checkpoint(source: str | os.PathLike, folder: str | os.PathLike, config: ConfigLike = None,
                       dtype: torch.dtype = torch.float32, overwrite: bool = False,
                       latent_stats: str | os.PathLike | None = None) -> tuple[CrossModalVAE, LoadReport]:
    """Turn a released `.ckpt` (or any supported weights file, or a model folder) into a model folder; with
    `latent_stats` (a latent_stats.json of `cmvae encode-dataset`), its statistics go into the config."""
    for name in MODEL_FILES:
        refuse_overwriting_input(Path(folder) / name, source)
    stats = None
    if latent_stats is not None:
        from .encode_dataset import read_latent_stats

        stats = read_latent_stats(latent_stats)
    if Path(source).is_dir():
        model, report = load_model(source, config=config, dtype=dtype), LoadReport()
    else:
        model, report = model_from_state_dict(read_state_dict(source), config, dtype=dtype)
    if stats is not None:
        try:
            model.set_latent_statistics(stats.mean, stats.std)
        except ValueError as error:
            raise CheckpointError(f"{latent_stats} does not fit this model: {error}") from None
    save_model(model, folder, overwrite=overwrite)
    return model, report
