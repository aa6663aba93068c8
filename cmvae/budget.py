"""Each level of the spatial encoder and decoder run the fastest way that fits a memory budget.

`LevelsWithinBudget` is the `local_map` the pipeline hands the model. For each level it compares the
memory the level would add (on top of what the process uses when the level starts) with what the
budget leaves:

1. whole, when it fits: the level's peak is measured on a small crop of its input (tensors alive,
   `memory.LiveTensors`) and scaled to the input's size (every tensor of a level scales with its
   pixels);
2. else in bands of rows (`cmvae.models.banded`), exact, with the cheapest modes and the tallest bands
   that fit;
3. else in square tiles with the whole frame's GroupNorm statistics (`cmvae.tiling`, exact mode),
   the largest that fit: the slow way, for frames so large that not even one tensor of the level fits
   at frame size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .memory import Budget, LiveTensors, format_size, memory_in_use, return_large_frees_at_once
from .models.attention import NOTHING_KEPT, in_region
from .models.banded import LevelPlan, plan_level, run_level
from .models.spatial import LevelCall
from .tiling import tiled_apply

log = logging.getLogger("cmvae")

# Whole-level peaks measured on crops miss allocations inside kernels (convolution scratch space,
# oneDNN's reordered weights) and the allocator's slack; this factor covers them (measured against the
# resident set in benchmarks/memory_model.py).
WHOLE_LEVEL_MARGIN = 1.05
# Held back from every level's allowance, for the pipeline's own buffers that grow while a level runs.
RESERVE_BYTES = 64 * 2**20
_PROBE_ROWS, _PROBE_COLUMNS, _PROBE_FRAMES = 16, 32, 2


@dataclass
class LevelRecord:
    name: str
    how: str  # "whole", "bands" or "tiles"
    detail: str
    allowance: int
    predicted: int


@dataclass
class LevelsWithinBudget:
    """The model's `local_map`: each level whole, in bands or in tiles, within `budget`."""

    model: torch.nn.Module
    budget: Budget
    device: torch.device
    notify: Callable[[str], None] | None = None
    records: list[LevelRecord] = field(default_factory=list)
    _per_pixel: dict = field(default_factory=dict)
    _told: bool = False

    def __post_init__(self) -> None:
        if self.device.type == "cpu":
            return_large_frees_at_once()

    def __call__(self, call: LevelCall, x: torch.Tensor, scale: int) -> torch.Tensor:
        allowance = self.budget.bytes - memory_in_use(self.device) - RESERVE_BYTES
        whole = self.whole_bytes(call, x)
        name = f"{'encoder' if call.coder is self.model.encoder else 'decoder'} level {call.level}"
        if whole <= allowance:
            self.records.append(LevelRecord(name, "whole", "", allowance, whole))
            return call(x)
        plan = self.band_plan(call, x, allowance)
        if plan is not None:
            self._record(LevelRecord(name, "bands", plan.describe(), allowance, plan.peak_bytes))
            return run_level(call, x, plan)
        tile, overlap, predicted = self._tiles_that_fit(call, x, scale, allowance)
        self._record(LevelRecord(name, "tiles", f"tiles of {tile} pixels overlapping by {overlap}", allowance,
                                 predicted))
        if predicted > allowance:
            log.warning("%s: even the smallest tiles (%d pixels) need about %s more than the memory budget "
                        "leaves; the run may exceed --max-memory", name, tile, format_size(predicted - allowance))
        align = max(2, self.model.cfg.spatial_compression // scale)
        return tiled_apply(call, x, tile, overlap, align=align, norm_root=self.model, norm="exact")

    @staticmethod
    def band_plan(call: LevelCall, x: torch.Tensor, allowance: int) -> LevelPlan | None:
        """Bands of at least 4 rows, else of any height: even bands of one or two rows cost far less than
        square tiles, whose exact statistics take a pass per GroupNorm, each with a halo on four sides."""
        return (plan_level(call, x.shape, x.element_size(), allowance)
                or plan_level(call, x.shape, x.element_size(), allowance, min_rows=1))

    def whole_bytes(self, call: LevelCall, x: torch.Tensor) -> int:
        """The memory running the level on `x` whole adds, from its peak on a crop."""
        per_pixel, _ = self._probe(call, x)
        return int(per_pixel * _pixels(x) * WHOLE_LEVEL_MARGIN)

    def _probe(self, call: LevelCall, x: torch.Tensor) -> tuple[float, float]:
        """Peak bytes of tensors alive, and bytes of the output, per input pixel (of every frame)."""
        layout = torch.channels_last_3d if x.shape[1] > 1 and x.stride(1) == 1 else torch.contiguous_format
        key = (id(call.coder), call.level, call.video, call.text is None, x.dtype, x.shape[1], layout, x.device)
        if key not in self._per_pixel:
            crop = x[..., :_PROBE_FRAMES, :_PROBE_ROWS, :_PROBE_COLUMNS].contiguous(memory_format=layout)
            with LiveTensors() as live, in_region(NOTHING_KEPT):  # a trial, not the frame
                out = call(crop)
            pixels = _pixels(crop)
            self._per_pixel[key] = (live.peak / pixels, out.numel() * out.element_size() / pixels)
        return self._per_pixel[key]

    def _tiles_that_fit(self, call: LevelCall, x: torch.Tensor, scale: int, allowance: int) -> tuple[int, int, int]:
        """The largest square tiles (in the level's pixels) whose work fits beside the level's output."""
        per_pixel, out_per_pixel = self._probe(call, x)
        output = int(out_per_pixel * _pixels(x))
        overlap = max(64 // scale, 32)
        per_tile_pixel = per_pixel * WHOLE_LEVEL_MARGIN * _pixels(x) / (x.shape[-2] * x.shape[-1])
        side = math.isqrt(max(int((allowance - output) / per_tile_pixel), 0))
        tile = max(side // 8 * 8, 2 * overlap + 8)
        return tile, overlap, output + int(per_tile_pixel * tile * tile)

    def _record(self, record: LevelRecord) -> None:
        self.records.append(record)
        log.info("%s: %s (%s); allowance %s, predicted %s", record.name, record.how, record.detail,
                 format_size(record.allowance), format_size(record.predicted))
        if self.notify is not None and not self._told:
            self._told = True
            self.notify(f"{self.budget.describe()}: levels that do not fit whole run in bands of rows, exactly "
                        f"(first: {record.name}, {record.how})")


def _pixels(x: torch.Tensor) -> int:
    return x.shape[0] * x.shape[2] * x.shape[3] * x.shape[4]
