"""The diagonal Gaussian posterior of each stage."""

from __future__ import annotations

import torch


class DiagonalGaussian:
    """Mean and log-variance split along channels (log-variance clamped to [-30, 20]).

    The interface of diffusers' posterior (`sample`, `mode`, `kl`); the KL is summed over every
    non-batch dimension, so it is right for 5D latents. (diffusers' own class sums over dims 1-3 and
    its module imports all of diffusers' U-Net blocks.)
    """

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # drawn on the generator's device, then moved, so a CPU generator also serves GPU tensors
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to the standard normal, one value per batch element."""
        dims = list(range(1, self.mean.ndim))
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
