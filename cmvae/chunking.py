"""Temporal chunks over a stream of frames: overlapping windows, outputs cross-faded, constant memory.

`windowed_map(stream, fn, window, overlap)` reads a stream of tensors along time (dim 2), runs
`fn` on windows of `window` steps whose starts are `window - overlap` apart, and yields the outputs
as soon as they are final. Where two windows overlap, their outputs are blended with linear
weights, so chunk boundaries do not jump. `fn` may change the time length by a fixed ratio (an
encoder: 1/4, a decoder: 4), and the overlap is blended in output steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChunkSettings:
    """Frames per temporal chunk and frames shared by consecutive chunks (both multiples of 4)."""

    frames: int = 16
    overlap: int = 0

    def __post_init__(self) -> None:
        if self.frames < 4 or self.frames % 4 or self.overlap % 4 or not 0 <= self.overlap < self.frames:
            raise ValueError(f"chunk frames must be a multiple of 4 (>= 4) and the overlap a multiple of 4 below "
                             f"it; got {self.frames} frames with overlap {self.overlap}")


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Where each window starts on a stream of `length` steps (the last window may be shorter)."""
    stride = window - overlap
    starts = [0]
    while starts[-1] + window < length:
        starts.append(starts[-1] + stride)
    return starts


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def windowed_map(stream: Iterable[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor], window: int,
                 overlap: int) -> Iterator[torch.Tensor]:
    """Apply `fn` over overlapping windows of a stream (B, C, t, ...) and yield blended output pieces.

    The stream's total length and every window boundary should be multiples of what `fn` needs
    (the caller pads the stream's end). Only about one window of input and output is held at once.
    """
    stride = window - overlap
    buffer: list[torch.Tensor] = []
    buffered = 0
    pending: torch.Tensor | None = None  # output of the last window's overlap, waiting to be blended
    for piece in stream:
        buffer.append(piece)
        buffered += piece.shape[2]
        while buffered >= window:
            frames = _cat(buffer)
            ready, pending = _blend(fn(frames[:, :, :window]), pending, overlap, window, final=False)
            yield ready
            buffer, buffered = [frames[:, :, stride:]], buffered - stride
    if buffered > (overlap if pending is not None else 0):
        ready, pending = _blend(fn(_cat(buffer)), pending, overlap, window, final=True)
        yield ready
    elif pending is not None:
        yield pending


def _blend(out: torch.Tensor, pending: torch.Tensor | None, overlap: int, window: int, final: bool):
    """Cross-fade the head of `out` with the previous window's tail; return (final part, new tail)."""
    ratio = out.shape[2] / window if not final else None
    if pending is not None:
        n = pending.shape[2]
        weight = (torch.arange(1, n + 1, device=out.device, dtype=torch.float32) / (n + 1)).view(1, 1, n, *[1] * (out.ndim - 3))
        head = pending.float() * (1 - weight) + out[:, :, :n].float() * weight
        out = torch.cat([head.to(out.dtype), out[:, :, n:]], dim=2)
    if final or overlap == 0:
        return out, None
    keep = out.shape[2] - round(overlap * ratio)
    return out[:, :, :keep], out[:, :, keep:]
