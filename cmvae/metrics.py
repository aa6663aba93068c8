"""Reconstruction metrics."""

from __future__ import annotations

import torch


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """PSNR in dB over all values, both tensors mapped from `value_range` to [0, 1] (peak 1)."""
    low, high = value_range
    a = (reference.detach().float() - low) / (high - low)
    b = (reconstruction.detach().float().clamp(low, high) - low) / (high - low)
    mse = torch.mean((a - b) ** 2).item()
    return float("inf") if mse == 0 else -10.0 * torch.log10(torch.tensor(mse)).item()
