"""Models with random weights for tests where the output only has to be reproducible, not good."""

from __future__ import annotations

import torch

from cmvae import CrossModalVAE


def with_temporal_layers(model: CrossModalVAE) -> CrossModalVAE:
    """Random weights, and temporal layers that are not zero as they are in a fresh model."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "_tmp" in name:
                parameter.normal_(0, 0.02)
    return model.eval()
