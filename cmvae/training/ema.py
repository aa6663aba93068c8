"""Exponential moving average of the trainable weights."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a DTensor); a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class EMA:
    """`shadow = d * shadow + (1 - d) * weight` after every optimizer step, kept in float32, with
    `d = min(decay, (1 + step) / (10 + step))`: early on the average follows the weights closely, so
    that a short run's average does not keep a large share of the random initial weights.

    Works on sharded (FSDP) parameters as they are: each rank averages its own shard.
    """

    def __init__(self, named_parameters: dict[str, nn.Parameter], decay: float):
        self.decay = decay
        self.parameters = named_parameters
        self.shadow = {name: p.detach().float().clone() for name, p in named_parameters.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the weights after optimizer step `step` (0 for the first)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        weights = [self.parameters[name].detach().float() for name in self.shadow]
        torch._foreach_lerp_(list(self.shadow.values()), weights, 1.0 - decay)  # one kernel for all, not one each

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole tensors on the CPU (a collective under FSDP: every rank must call it)."""
        return {name: _full(tensor).cpu() for name, tensor in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"the checkpoint's EMA lacks {len(missing)} trainable weights, e.g. {missing[0]}")
        for name, tensor in self.shadow.items():
            value = state[name]
            if hasattr(tensor, "device_mesh"):  # a shard: take this rank's part of the whole tensor
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(tensor.device_mesh.device_type), tensor.device_mesh,
                                          tensor.placements)
            tensor.copy_(value)

    @contextlib.contextmanager
    def applied(self):
        """The model with the averaged weights inside the block, its own weights restored after."""
        saved = {name: p.detach().clone() for name, p in self.parameters.items()}
        with torch.no_grad():
            for name, parameter in self.parameters.items():
                parameter.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, parameter in self.parameters.items():
                    parameter.copy_(saved[name])
