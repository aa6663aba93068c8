"""Spatial tiling for any autoencoder: overlapping tiles, blended, with GroupNorm statistics of the whole frame.

`tiled_apply(fn, x, ...)` runs `fn` on overlapping tiles of the last two dimensions of `x` and joins the
outputs. The pipeline hands it one level of the model at a time (`local_map` of `CrossModalVAE.encode`
and `decode`), whose outputs depend on a neighbourhood only, apart from GroupNorm: a GroupNorm pools its
statistics over the whole frame (and all frames of a chunk), so a tile that normalises with its own
statistics shifts colours and leaves seams. Three ways to deal with that (`norm`):

- `"exact"`: the statistics of the whole frame, exactly. Pass k runs every tile up to the k-th
  GroupNorm (the earlier ones normalised with the statistics gathered so far), adds the statistics of
  the region the tile owns, and stops the tile; the last pass runs the tiles through. A level with K
  GroupNorms costs K + 1 passes over partly run tiles. Tiles keep only the region they own (their
  overlaps are cut at the middle), since the rest is what the tile's borders disturb; where half the
  overlap covers the level's reach, the output equals the untiled output up to rounding.
- `"first-pass"`: one pass over non-overlapping tiles, each normalised with its own statistics,
  gathers approximate statistics of the frame; a second pass normalises every tile with them; the
  tiles are blended linearly across the overlaps.
- `"per-tile"`: every tile uses its own statistics; linear blending. One pass.

Nothing here knows the network: it finds `nn.GroupNorm` modules and patches their forward for the
duration, and tells whoever records attention (`cmvae.models.attention.in_region`) where each tile sits.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .models.attention import NOTHING_KEPT, Region, in_region

NORM_MODES = ("exact", "first-pass", "per-tile")

Stats = dict[tuple[int, int], list[torch.Tensor]]  # (norm, call) -> [count, mean, M2] per (sample, group)


@dataclass(frozen=True)
class TileSettings:
    """Tile side and overlap in pixels of the video at full resolution; deeper, smaller levels of
    the model get tiles of about the same place and size in the frame (see `level_tiles`). `tile=0` turns
    tiling off; `norm` is one of `NORM_MODES`."""

    tile: int = 256
    overlap: int = 64
    norm: str = "exact"

    def __post_init__(self) -> None:
        if self.tile and not 0 <= self.overlap < self.tile:
            raise ValueError(f"tile overlap must be in [0, tile), got {self.overlap} for tile {self.tile}")
        if self.norm not in NORM_MODES:
            raise ValueError(f"tile norm must be one of {', '.join(NORM_MODES)}, got {self.norm!r}")

    def level_tiles(self, scale: int) -> tuple[int, int]:
        """Tile and overlap, in the level's own pixels, for a level at 1/`scale` of the frame's
        resolution: the frame's tiling scaled down, but at least 64 pixels with 32 of overlap in
        deeper levels. A level reaches a dozen or more of its own pixels (more with text, whose
        cross-attention sees whole patches), however small its resolution; half the overlap must
        cover that for tiles to reproduce the whole frame."""
        if scale == 1:
            return self.tile, self.overlap
        tile = max(self.tile // scale, 64) // 2 * 2
        overlap = min(max(self.overlap // scale, 32), tile // 2) // 2 * 2
        return tile, overlap


def tile_spans(size: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int]]:
    """Start and end of the fewest tiles, at most `tile` long (rounded down to `align`), that cover
    [0, size) with neighbours overlapping by at least `overlap`: all of one length, the shortest that
    needs no more tiles, starts on multiples of `align` (the last is flush with the end, so on one if
    `size` is)."""
    tile = max(align, tile // align * align)
    if size <= tile:
        return [(0, size)]
    overlap = min(overlap, tile - align)  # rounding the tile down may have left no room for the overlap
    count = _tile_count(size, tile, overlap, align)
    length = tile
    while length - align > overlap and _tile_count(size, length - align, overlap, align) == count:
        length -= align
    step = math.ceil((size - length) / (count - 1) / align) * align
    starts = [i * step for i in range(count - 1) if i * step < size - length] + [size - length]
    return [(start, start + length) for start in starts]


def _tile_count(size: int, length: int, overlap: int, align: int) -> int:
    step = (length - overlap) // align * align
    return math.ceil((size - length) / step) + 1


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


class _StopTile(Exception):
    """Raised inside a tile once it has given the statistics this pass gathers."""


class SharedGroupNorm:
    """Makes every `nn.GroupNorm` under `root` normalise with statistics gathered over a whole frame.

    Statistics are kept per GroupNorm call, (sample, group) by (sample, group), over the region each tile
    owns (`start_tile`), so that overlapping tiles are not counted twice. Modes: `collect` gathers
    while normalising the tile with its own statistics; `apply` normalises with the gathered ones;
    `progressive` normalises with the gathered ones where it has them, and at the first GroupNorm
    it has none for, gathers them (into `pending`) and stops the tile. Inputs with fewer than 4
    dimensions (per-position norms such as the temporal attention's) are left alone.
    """

    def __init__(self, root: nn.Module):
        self.norms = [m for m in root.modules() if isinstance(m, nn.GroupNorm)]
        self.stats: Stats = {}
        self.pending: Stats = {}
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
        """Before each tile: the mode, and the owned region as fractions of the tile (y0, y1, x0, x1)."""
        self.mode, self.owned = mode, owned
        self.calls.clear()

    def commit(self) -> bool:
        """After a progressive pass: the pending statistics become usable. False if there were none."""
        self.stats.update(self.pending)
        found, self.pending = bool(self.pending), {}
        return found

    def _forward(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 4 or self.mode is None:
            return type(norm).forward(norm, x)
        key = (id(norm), self.calls[id(norm)])
        self.calls[id(norm)] += 1
        if self.mode == "collect":
            _accumulate(self.stats, key, norm.num_groups, self._owned_part(x))
            return type(norm).forward(norm, x)
        if self.mode == "progressive" and key not in self.stats:
            _accumulate(self.pending, key, norm.num_groups, self._owned_part(x))
            raise _StopTile
        return self._normalise(norm, x, key)

    def _owned_part(self, x: torch.Tensor) -> torch.Tensor:
        y0, y1, x0, x1 = self.owned
        h, w = x.shape[-2:]
        return x[..., round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w)]

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


def _accumulate(stats: Stats, key, groups: int, part: torch.Tensor) -> None:
    """Adds a region's mean and variance per (sample, group), merged in float64 (Chan et al.'s update)."""
    grouped = part.float().reshape(part.shape[0], groups, -1)
    count = torch.tensor(float(grouped.shape[-1]), dtype=torch.float64)
    mean = grouped.mean(-1).double()
    m2 = grouped.var(-1, unbiased=False).double() * count
    if key not in stats:
        stats[key] = [count, mean, m2]
        return
    total, old_mean, old_m2 = stats[key]
    delta = mean - old_mean
    new_total = total + count
    stats[key] = [new_total, old_mean + delta * count / new_total,
                  old_m2 + m2 + delta.square() * total * count / new_total]


class _Canvas:
    """Joins tile outputs at the output's scale, which the first output tells: blended linearly across
    the overlaps (summed with weights in float32, then divided), or, with `owned`, each tile's owned
    region copied in place (in the tiles' dtype: no second copy of the frame)."""

    def __init__(self, rows, cols, owned: tuple[list, list] | None = None):
        self.rows, self.cols, self.owned = rows, cols, owned
        self.out = None

    def _start(self, y: torch.Tensor, scale: float) -> None:
        self.rows, self.cols = _scaled(self.rows, scale), _scaled(self.cols, scale)
        shape = (*y.shape[:-2], self.rows[-1][1], self.cols[-1][1])
        self.dtype = y.dtype
        if self.owned is not None:
            self.owned = tuple(_scaled(spans, scale) for spans in self.owned)
            self.out = torch.empty(shape, dtype=y.dtype, device=y.device)
            return
        self.row_weights, self.col_weights = _blend_weights(self.rows), _blend_weights(self.cols)
        self.out = torch.zeros(shape, dtype=torch.float32, device=y.device)
        self.weight_sum = torch.zeros(shape[-2:], dtype=torch.float32, device=y.device)

    def add(self, i: int, j: int, y: torch.Tensor) -> None:
        if self.out is None:
            self._start(y, y.shape[-2] / (self.rows[i][1] - self.rows[i][0]))
        (r0, r1), (c0, c1) = self.rows[i], self.cols[j]
        if self.owned is not None:
            (o0, o1), (p0, p1) = self.owned[0][i], self.owned[1][j]
            self.out[..., o0:o1, p0:p1] = y[..., o0 - r0:o1 - r0, p0 - c0:p1 - c0]
            return
        w = (self.row_weights[i][:, None] * self.col_weights[j][None, :]).to(y.device)
        self.out[..., r0:r1, c0:c1] += y.float() * w
        self.weight_sum[r0:r1, c0:c1] += w

    def result(self) -> torch.Tensor:
        if self.owned is not None:
            return self.out
        return self.out.div_(self.weight_sum).to(self.dtype)


def _scaled(spans: list[tuple[int, int]], scale: float) -> list[tuple[int, int]]:
    return [(round(start * scale), round(end * scale)) for start, end in spans]


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
                align: int = 1, norm_root: nn.Module | None = None, norm: str = "exact") -> torch.Tensor:
    """`fn` over overlapping tiles of `x` (..., H, W), joined; `fn` may rescale H and W (by the same
    factor for every tile). Without tiling (the frame fits one tile) it is `fn(x)`.

    `tile`, `overlap` and `align` are in units of `x`; tile starts and the cuts between owned regions
    fall on multiples of `align`, so a `fn` that downsamples by `align` keeps its grid. The GroupNorms
    under `norm_root` get the statistics `norm` says (see the module's docstring); without
    `norm_root` every tile uses its own.
    """
    height, width = x.shape[-2:]
    rows, cols = tile_spans(height, tile, overlap, align), tile_spans(width, tile, overlap, align)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)
    if norm_root is None or norm == "per-tile":
        return _join(fn, x, rows, cols)
    shared = SharedGroupNorm(norm_root)
    with shared.patched():
        if norm == "first-pass":
            _gather_first_pass(fn, x, shared, tile, align)
            return _join(fn, x, rows, cols, shared)
        owned = owned_spans(rows, align), owned_spans(cols, align)
        while True:
            out = _join(fn, x, rows, cols, shared, owned)
            if not shared.commit():
                return out


def _gather_first_pass(fn, x: torch.Tensor, shared: SharedGroupNorm, tile: int, align: int) -> None:
    """Non-overlapping tiles, each normalised with its own statistics, add up those of the frame."""
    height, width = x.shape[-2:]
    for r0, r1 in owned_spans(tile_spans(height, tile, 0, align), align):
        for c0, c1 in owned_spans(tile_spans(width, tile, 0, align), align):
            shared.start_tile("collect")
            with in_region(NOTHING_KEPT):  # statistics only: this pass's outputs are not the frame's
                fn(x[..., r0:r1, c0:c1])


def _join(fn, x, rows, cols, shared: SharedGroupNorm | None = None, owned: tuple[list, list] | None = None
          ) -> torch.Tensor | None:
    """One pass over the tiles, blended, or cut to the `owned` regions in a progressive pass; None if
    the pass stopped the tiles."""
    canvas = _Canvas(rows, cols, owned)
    stopped = False
    kept = owned or (owned_spans(rows), owned_spans(cols))
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            height, width = x.shape[-2:]
            if owned is not None:
                region = _fractions(rows[i], owned[0][i]) + _fractions(cols[j], owned[1][j])
                shared.start_tile("progressive", region)
            elif shared is not None:
                shared.start_tile("apply")
            region = Region((r0 / height, r1 / height), (c0 / width, c1 / width),
                            tuple(v / height for v in kept[0][i]), tuple(v / width for v in kept[1][j]))
            try:
                with in_region(region):
                    y = fn(x[..., r0:r1, c0:c1])
            except _StopTile:
                stopped = True
                continue
            canvas.add(i, j, y)
    return None if stopped else canvas.result()


def _fractions(span: tuple[int, int], owned: tuple[int, int]) -> tuple[float, float]:
    (start, end), (own_start, own_end) = span, owned
    return (own_start - start) / (end - start), (own_end - start) / (end - start)
