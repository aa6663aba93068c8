"""cmvae: the Cross-modal Video VAE (Xing et al., arXiv 2412.17805), practical."""

from .checkpoints import CheckpointError, load_model, save_model
from .models import PRESETS, CMVAEConfig, CrossModalVAE, DiagonalGaussian, TextContext, preset

__version__ = "0.1.0"

__all__ = ["CMVAEConfig", "CheckpointError", "CrossModalVAE", "DiagonalGaussian", "PRESETS", "TextContext",
           "load_model", "preset", "save_model"]
