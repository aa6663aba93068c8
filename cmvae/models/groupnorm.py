"""GroupNorm for inference from per-row sums, so that a frame run in bands of rows normalises exactly
as the whole frame does.

`F.group_norm` reduces a whole group in one kernel, in an order no band of rows can reproduce; in
bfloat16 the last-bit differences that leaves in the statistics flip roundings that grow through the
network (whole-frame output 54 dB from itself with statistics computed another way, on the default
model). Here the statistics come from sums over single rows of single frames (`row_sums`, float32,
the same numbers whether the row sits in a whole frame or in a band), combined in float64
(`RowSums.finish`); the normalisation is `F.batch_norm` with those statistics. A band thus
normalises bit for bit as the whole frame, and on the CPU this is about as fast as `F.group_norm`
(faster in bfloat16, which it reads without a float32 copy).

`row_statistics()` switches `GroupNorm32` to it for 5D inputs (the pipeline does, for whole and
banded levels alike); training keeps `F.group_norm`, whose statistics are differentiable.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_ROW_STATISTICS = contextvars.ContextVar("cmvae_row_statistics", default=False)


@contextlib.contextmanager
def row_statistics(enabled: bool = True) -> Iterator[None]:
    """Within the block, `GroupNorm32` normalises 5D inputs with `group_norm_rows`."""
    token = _ROW_STATISTICS.set(enabled)
    try:
        yield
    finally:
        _ROW_STATISTICS.reset(token)


def row_statistics_enabled() -> bool:
    return _ROW_STATISTICS.get()


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.shape[1] > 1 and x.stride(1) == 1


def row_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of x and of x squared over each row of each frame: (N, C, T, H) float32 each.

    Reducing only along the row keeps the arithmetic of every row independent of the rows around
    it; the view puts the row's pixels in the reduced dimension whatever the memory layout.
    """
    xf = x.float()
    if _is_channels_last(xf):
        rows = xf.permute(0, 2, 3, 4, 1)  # (N, T, H, W, C)
        return rows.sum(3).permute(0, 3, 1, 2), torch.linalg.vector_norm(rows, 2, 3).square().permute(0, 3, 1, 2)
    return xf.sum(-1), torch.linalg.vector_norm(xf, 2, -1).square()


class RowSums:
    """Row sums of a (N, C, T, H, W) tensor, filled band by band (or at once), then turned into
    per-channel mean and variance of each (sample, group)."""

    def __init__(self, shape: torch.Size | tuple[int, ...], device: torch.device):
        n, c, t, h, _ = shape
        self.sums = torch.zeros(2, n, c, t, h, dtype=torch.float32, device=device)
        self.count = t * h * shape[-1]

    def add(self, band: torch.Tensor, first_row: int) -> None:
        s1, s2 = row_sums(band)
        rows = band.shape[-2]
        self.sums[0, ..., first_row:first_row + rows] = s1
        self.sums[1, ..., first_row:first_row + rows] = s2

    def finish(self, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance), each (N, C) float32: the statistics of each channel's group."""
        n, c = self.sums.shape[1:3]
        per_group = self.sums.double().reshape(2, n, groups, -1).sum(-1) / (self.count * (c // groups))
        mean, mean_square = per_group
        var = (mean_square - mean.square()).clamp_min(0)
        expand = lambda v: v.repeat_interleave(c // groups, dim=1).float()  # noqa: E731
        return expand(mean), expand(var)


def group_statistics(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    sums = RowSums(x.shape, x.device)
    sums.add(x, 0)
    return sums.finish(groups)


def normalize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm of `x` (N, C, ...) with given per-(sample, channel) statistics, computed in float32
    and returned in x's dtype."""
    n, c = x.shape[:2]
    # batch_norm's kernel for dense tensors and the one for strided views (a band of rows) round
    # differently: give it a dense tensor always
    x = x.contiguous(memory_format=torch.channels_last_3d if _is_channels_last(x) else torch.contiguous_format)
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    if n == 1:
        return F.batch_norm(x, mean[0], var[0], weight, bias, False, 0.0, norm.eps)
    # batch_norm's statistics are per channel: make every (sample, channel) a channel of one sample
    flat = x.reshape(1, n * c, *x.shape[2:])
    weight = None if weight is None else weight.repeat(n)
    bias = None if bias is None else bias.repeat(n)
    out = F.batch_norm(flat, mean.reshape(-1), var.reshape(-1), weight, bias, False, 0.0, norm.eps)
    return out.reshape(x.shape)


def group_norm_rows(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """`norm(x)` for a (N, C, T, H, W) tensor, with statistics from row sums."""
    mean, var = group_statistics(x, norm.num_groups)
    return normalize(x, mean, var, norm)
