"""Training and fine-tuning the Cross-modal Video VAE: the paper's losses and schedule, from one CPU to
many GPUs (torchrun with DDP or FSDP). See docs/training.md.

The names below are imported on first use, so that `cmvae --help` does not wait for PyTorch."""

from __future__ import annotations

import importlib

_WHERE = {"export_run": ".checkpoint", "ConfigError": ".config", "TrainConfig": ".config",
          "config_from_dict": ".config", "load_config": ".config", "Trainer": ".trainer"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'cmvae.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
