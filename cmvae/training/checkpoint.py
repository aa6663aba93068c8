"""Training checkpoints of a run folder: atomic writes, the last k kept, and export to a model folder.

A checkpoint is one file `checkpoints/step-NNNNNNNN.pt` with whole (unsharded) tensors: the model,
the optimisers, the discriminators, the EMA, the step, the data position and every rank's random state.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from ..checkpoints import load_weights, save_model
from ..models import CMVAEConfig, CrossModalVAE

_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_folder(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoints, oldest first."""
    folder = checkpoint_folder(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def write_checkpoint(run_dir: str | os.PathLike, step: int, state: dict, keep: int) -> Path:
    """Write `state` under a temporary name, rename it into place, then delete all but the last `keep`."""
    folder = checkpoint_folder(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a damaged file raises many kinds of errors
        raise ValueError(f"{path} is not a readable training checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise ValueError(f"{path} is not a cmvae training checkpoint")
    return state


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A checkpoint file, or the latest checkpoint of a run folder."""
    source = Path(source)
    if source.is_dir():
        latest = latest_checkpoint(source)
        if latest is None:
            raise ValueError(f"{source} holds no checkpoints (expected {checkpoint_folder(source)}/step-*.pt)")
        return latest
    return source


def model_from_checkpoint(state: dict, use_ema: bool = True) -> CrossModalVAE:
    """The trained model of a checkpoint; its EMA weights where it has them and `use_ema`."""
    weights = dict(state["model"])
    if use_ema and state.get("ema"):
        weights.update(state["ema"])
    model = CrossModalVAE.from_cmvae_config(CMVAEConfig.from_dict(state["model_config"]))
    load_weights(model, weights)
    return model.eval()


def export_run(source: str | os.PathLike, folder: str | os.PathLike, use_ema: bool = True,
               overwrite: bool = False) -> Path:
    """Write the model of a run folder's latest checkpoint (or of a checkpoint file) as a model folder
    that `cmvae.load_model` and `CrossModalVAE.from_pretrained` read (`overwrite`: see `save_model`)."""
    state = read_checkpoint(resolve_checkpoint(source))
    return save_model(model_from_checkpoint(state, use_ema), folder, overwrite=overwrite)
