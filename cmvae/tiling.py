"""Spatial tiling for any autoencoder: overlapping tiles, linear blending, shared GroupNorm statistics.

`tiled_apply(fn, x, ...)` runs `fn` on overlapping tiles of the last two dimensions of `x` and blends
the outputs linearly across the overlaps. The pipeline hands it the model's full-resolution levels
(`local_map` of `CrossModalVAE.encode` and `decode`), whose outputs depend on a neighbourhood only. Per-tile GroupNorm
statistics are the usual cause of seams and colour shifts in tiled VAEs: with `shared_norm`, a first
pass over non-overlapping tiles gathers every GroupNorm's statistics over the whole frame (for all
frames of the chunk), and the second, overlapping pass normalises every tile with them. Nothing
here knows the network: it finds `nn.GroupNorm` modules and patches their forward for the duration.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TileSettings:
    """Tile side and overlap in input pixels of the video (latent tiles are these divided by the
    model's spatial compression). `tile=0` turns tiling off."""

    tile: int = 256
    overlap: int = 64
    shared_norm: bool = True

    def __post_init__(self) -> None:
        if self.tile and not 0 <= self.overlap < self.tile:
            raise ValueError(f"tile overlap must be in [0, tile), got {self.overlap} for tile {self.tile}")


def tile_spans(size: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int]]:
    """Start and end of tiles that cover [0, size): `tile` long, consecutive starts `tile - overlap`
    apart (rounded down to `align`), the last one flush with the end."""
    if size <= tile:
        return [(0, size)]
    stride = max(align, (tile - overlap) // align * align)
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return [(s, s + tile) for s in starts]


def owned_spans(spans: list[tuple[int, int]], align: int = 1) -> list[tuple[int, int]]:
    """A partition of the covered range: each overlap is split at its middle (rounded to `align`)."""
    cuts = [spans[0][0]]
    for (_, end), (start, _) in zip(spans, spans[1:]):
        cuts.append((start + end) // 2 // align * align)
    cuts.append(spans[-1][1])
    return list(zip(cuts, cuts[1:]))


def _ramp(length: int, overlap_before: int, overlap_after: int) -> torch.Tensor:
    """1D blending weights: rising over the overlap with the previous tile, falling over the next."""
    weights = torch.ones(length)
    if overlap_before:
        weights[:overlap_before] = torch.arange(1, overlap_before + 1) / (overlap_before + 1)
    if overlap_after:
        weights[length - overlap_after:] = torch.arange(overlap_after, 0, -1) / (overlap_after + 1)
    return weights


def _blend_weights(spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    out = []
    for i, (start, end) in enumerate(spans):
        before = spans[i - 1][1] - start if i > 0 else 0
        after = end - spans[i + 1][0] if i + 1 < len(spans) else 0
        out.append(_ramp(end - start, max(before, 0), max(after, 0)))
    return out


class SharedGroupNorm:
    """Makes every `nn.GroupNorm` under `root` use statistics gathered over a whole frame.

    `collect(owned)` accumulates, per GroupNorm call, the mean and variance of each (sample, group)
    over the tile's owned region only (so overlapping tiles are not counted twice), while
    normalising the tile as usual; `apply()` normalises with the accumulated statistics. Inputs
    with fewer than 4 dimensions (per-position norms such as the temporal attention's) are left alone.
    """

    def __init__(self, root: nn.Module):
        self.norms = [m for m in root.modules() if isinstance(m, nn.GroupNorm)]
        self.stats: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.mode: str | None = None
        self.owned: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0)
        self.calls: Counter = Counter()

    @contextlib.contextmanager
    def patched(self) -> Iterator[SharedGroupNorm]:
        for norm in self.norms:
            norm.forward = lambda x, norm=norm: self._forward(norm, x)
        try:
            yield self
        finally:
            for norm in self.norms:
                del norm.forward

    def start_tile(self, mode: str, owned: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0)) -> None:
        """Before each tile: `collect` or `apply`, and the owned region as fractions (y0, y1, x0, x1)."""
        self.mode, self.owned = mode, owned
        self.calls.clear()

    def _forward(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 4 or self.mode is None:
            return type(norm).forward(norm, x)
        key = (id(norm), self.calls[id(norm)])
        self.calls[id(norm)] += 1
        if self.mode == "collect":
            self._accumulate(key, norm.num_groups, self._owned_part(x))
            return type(norm).forward(norm, x)
        return self._normalise(norm, x, key)

    def _owned_part(self, x: torch.Tensor) -> torch.Tensor:
        y0, y1, x0, x1 = self.owned
        h, w = x.shape[-2:]
        return x[..., round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w)]

    def _accumulate(self, key, groups: int, part: torch.Tensor) -> None:
        grouped = part.float().reshape(part.shape[0], groups, -1)
        count = torch.tensor(float(grouped.shape[-1]), dtype=torch.float64)
        mean = grouped.mean(-1).double()
        m2 = grouped.var(-1, unbiased=False).double() * count
        if key not in self.stats:
            self.stats[key] = [count, mean, m2]
            return
        total, old_mean, old_m2 = self.stats[key]
        delta = mean - old_mean  # parallel mean/variance merge (Chan et al.)
        new_total = total + count
        self.stats[key] = [new_total, old_mean + delta * count / new_total,
                           old_m2 + m2 + delta.square() * total * count / new_total]

    def _normalise(self, norm: nn.GroupNorm, x: torch.Tensor, key) -> torch.Tensor:
        total, mean, m2 = self.stats[key]
        b, c = x.shape[:2]
        inv_std = torch.rsqrt(m2 / total + norm.eps).float()
        grouped = x.float().reshape(b, norm.num_groups, -1)
        y = ((grouped - mean.float()[..., None]) * inv_std[..., None]).reshape(x.shape)
        if norm.affine:
            shape = (1, c) + (1,) * (x.ndim - 2)
            y = y * norm.weight.float().reshape(shape) + norm.bias.float().reshape(shape)
        return y.to(x.dtype)


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
                align: int = 1, norm_root: nn.Module | None = None, on_tile: Callable[[], None] | None = None
                ) -> torch.Tensor:
    """`fn` over overlapping tiles of `x` (..., H, W), outputs blended; `fn` may rescale H and W
    (by the same factor for every tile). Without tiling (the frame fits one tile) it is `fn(x)`.

    `tile`, `overlap` and `align` are in units of `x`. With `norm_root`, its GroupNorms share
    statistics gathered in a first pass over non-overlapping tiles.
    """
    height, width = x.shape[-2:]
    rows, cols = tile_spans(height, tile, overlap, align), tile_spans(width, tile, overlap, align)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)
    if norm_root is None:
        return _blend_tiles(fn, x, rows, cols, on_tile)
    shared = SharedGroupNorm(norm_root)
    with shared.patched():
        # First pass: tiles without overlap, only to gather statistics over the whole frame.
        plain_rows, plain_cols = tile_spans(height, tile, 0, align), tile_spans(width, tile, 0, align)
        for r0, r1 in owned_spans(plain_rows, align):
            for c0, c1 in owned_spans(plain_cols, align):
                shared.start_tile("collect")
                fn(x[..., r0:r1, c0:c1])
                if on_tile:
                    on_tile()
        shared.start_tile("apply")
        return _blend_tiles(fn, x, rows, cols, on_tile, shared)


def _blend_tiles(fn, x, rows, cols, on_tile, shared: SharedGroupNorm | None = None) -> torch.Tensor:
    out = weight_sum = None
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            if shared is not None:
                shared.start_tile("apply")
            y = fn(x[..., r0:r1, c0:c1])
            if out is None:  # the first tile tells the output's scale, shape and device
                scale = y.shape[-2] / (r1 - r0)
                out_rows, out_cols = _scale_spans(rows, scale), _scale_spans(cols, scale)
                row_weights, col_weights = _blend_weights(out_rows), _blend_weights(out_cols)
                shape = (*y.shape[:-2], out_rows[-1][1], out_cols[-1][1])
                out = torch.zeros(shape, dtype=torch.float32, device=y.device)
                weight_sum = torch.zeros(shape[-2:], dtype=torch.float32, device=y.device)
            (rs, re), (cs, ce) = out_rows[i], out_cols[j]
            w = (row_weights[i][:, None] * col_weights[j][None, :]).to(y.device)
            out[..., rs:re, cs:ce] += y.float() * w
            weight_sum[rs:re, cs:ce] += w
            if on_tile:
                on_tile()
    return (out / weight_sum).to(y.dtype)  # blended in float32, returned in fn's dtype


def _scale_spans(spans: list[tuple[int, int]], scale: float) -> list[tuple[int, int]]:
    return [(round(start * scale), round(end * scale)) for start, end in spans]


def tile_count(height: int, width: int, settings: TileSettings, align: int) -> int:
    """Tiles per chunk (both passes) for progress reporting."""
    rows = tile_spans(height, settings.tile, settings.overlap, align)
    cols = tile_spans(width, settings.tile, settings.overlap, align)
    if len(rows) == 1 and len(cols) == 1:
        return 1
    count = len(rows) * len(cols)
    if settings.shared_norm:
        count += len(tile_spans(height, settings.tile, 0, align)) * len(tile_spans(width, settings.tile, 0, align))
    return count
