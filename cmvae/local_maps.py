"""The two ways to run the model's spatial levels on bounded memory, as `local_map`s for `encode`/`decode`.

- `tiled_levels(model, tiling)`: every level in overlapping tiles of a fixed size (`cmvae.tiling`).
- `levels_within(model, max_memory, device)`: each level whole, in bands of rows or in tiles, whichever
  is fastest within a memory budget (`cmvae.budget`).

The pipeline and the model's `enable_tiling` both build theirs here.
"""

from __future__ import annotations

import torch

from .budget import LevelsWithinBudget
from .memory import Budget, default_budget, parse_size
from .models.spatial import LocalMap
from .tiling import TileSettings, tiled_apply


def tiled_levels(model: torch.nn.Module, tiling: TileSettings) -> LocalMap:
    """Each level in tiles of the frame's tiling, scaled to the level."""
    spatial_factor = model.cfg.spatial_compression

    def local_map(fn, x: torch.Tensor, scale: int) -> torch.Tensor:
        tile, overlap = tiling.level_tiles(scale)
        # tiles start and are cut on the frame's grid of `spatial_factor` pixels, which keeps every
        # level's downsampling and its cross-attention's patches where they are in the whole frame
        align = max(2, spatial_factor // scale)
        return tiled_apply(fn, x, tile, overlap, align=align, norm_root=model, norm=tiling.norm)

    return local_map


def levels_within(model: torch.nn.Module, max_memory: int | str | None, device: torch.device,
                  notify=None) -> LevelsWithinBudget:
    """Each level the fastest way that keeps the process within `max_memory` (None: from the machine)."""
    budget = Budget(parse_size(max_memory), "asked for") if max_memory is not None else default_budget(device)
    return LevelsWithinBudget(model, budget, device, notify)
