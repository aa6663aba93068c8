"""cmvae: the Cross-modal Video VAE (Xing et al., arXiv 2412.17805), practical.

The names below are imported on first use: importing PyTorch takes seconds, and the command line
(`cmvae --help`, a mistyped option) should not wait for it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {"CheckpointError": ".checkpoints", "load_model": ".checkpoints", "save_model": ".checkpoints",
          "PRESETS": ".models", "CMVAEConfig": ".models", "CrossModalVAE": ".models",
          "DiagonalGaussian": ".models", "TextContext": ".models", "preset": ".models"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'cmvae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
