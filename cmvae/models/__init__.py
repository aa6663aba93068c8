"""The network of the Cross-modal Video VAE: pure modules, no I/O."""

from .attention import TextContext
from .autoencoder import CMVAEOutput, CrossModalVAE
from .config import PRESETS, CMVAEConfig, preset
from .distributions import DiagonalGaussian

__all__ = ["CMVAEConfig", "CMVAEOutput", "CrossModalVAE", "DiagonalGaussian", "PRESETS", "TextContext", "preset"]
