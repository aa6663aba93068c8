"""Training data held resident as uint8: decoded once, then cut into batches where the model runs.

`data.loader: resident` decodes every video and image of the run once (in threads, scaled as the
decoding workers would scale them) into a store of uint8 frames, kept on the training device when
it fits there (else in page-locked host memory). A batch is then a handful of slicing and copy
kernels on the device: the same samples, clip positions and crops as the decoding workers give for
the same seed (`TrainingBatches`), with no decoding, no host-to-device copy of float pixels and no
waiting on the host.

A *pack* (`data.pack`) keeps such a store on disk for reuse: `frames.u8` (all frames, raw) and
`index.json` (each item's source, shape and offset), memory-mapped when read. Packs let a corpus be
decoded once for many runs, and let machines without a video decoder train on it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..files import install_folder, staging_folder
from ..video_io import MediaError, is_image_path
from .data import (BatchPlan, MediaItem, SampleSettings, SkipSample, TrainingBatches, clip_indices, cover_size,
                   decode_frames, frame_count)

logger = logging.getLogger(__name__)

PACK_FORMAT = "cmvae-pack-1"
PACK_FILES = ("frames.u8", "index.json")
PACK_SEPARATOR = "::"  # items of a pack are named FOLDER::NAME
DEVICE_SHARE = 0.3  # at most this share of the free GPU memory goes to the store


# ---- packs on disk --------------------------------------------------------------------------


def write_pack(folder: str | os.PathLike, items: Iterable[tuple]) -> Path:
    """Write items (name, caption, frames (T, H, W, 3) uint8[, repeat]) as a pack folder, atomically.

    An item with `repeat` n is stored once and listed n times (drawn n times as often). An existing
    pack is replaced; any other non-empty folder is refused (nothing of the user's is deleted)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    replaced = _replaceable_pack_files(folder)
    entries, offset = [], 0
    with staging_folder(folder) as staging:
        with (staging / "frames.u8").open("wb") as raw:
            for name, caption, frames, *repeat in items:
                frames = np.ascontiguousarray(frames, dtype=np.uint8)
                if frames.ndim != 4 or frames.shape[-1] != 3:
                    raise ValueError(f"pack item {name}: expected frames (T, H, W, 3), got {frames.shape}")
                raw.write(frames.tobytes())
                entries.append({"path": name, "caption": caption, "shape": list(frames.shape), "offset": offset,
                                "repeat": int(repeat[0]) if repeat else 1})
                offset += frames.nbytes
        (staging / "index.json").write_text(json.dumps({"format": PACK_FORMAT, "items": entries}))
        install_folder(staging, folder, replaced)
    read_pack.cache_clear()
    return folder


def _replaceable_pack_files(folder: Path) -> list[str]:
    if not folder.is_dir() or not any(folder.iterdir()):
        return []
    if not is_pack(folder):
        raise FileExistsError(f"cannot write a pack to {folder}: it exists, is not empty and is not a pack")
    return list(PACK_FILES)


def is_pack(folder: Path) -> bool:
    return all((folder / name).is_file() for name in PACK_FILES)


@functools.cache
def read_pack(folder: str) -> tuple[list[MediaItem], dict[str, torch.Tensor]]:
    """The items of a pack and their frames, memory-mapped (nothing is read until used)."""
    folder = Path(folder)
    try:
        index = json.loads((folder / "index.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder} is not a training data pack (no readable index.json: {error})") from None
    if index.get("format") != PACK_FORMAT:
        raise ValueError(f"{folder} is not a training data pack of format {PACK_FORMAT}")
    raw = np.memmap(folder / "frames.u8", dtype=np.uint8, mode="c")  # copy-on-write: never changes the file
    items, frames = [], {}
    for entry in index["items"]:
        shape = tuple(entry["shape"])
        count = int(np.prod(shape))
        key = f"{folder}{PACK_SEPARATOR}{entry['path']}"  # unique even when two packs hold the same name
        items += [MediaItem(key, entry.get("caption", ""))] * int(entry.get("repeat", 1))
        frames[key] = torch.from_numpy(raw[entry["offset"]: entry["offset"] + count].reshape(shape))
    return items, frames


# ---- the store ------------------------------------------------------------------------------


def _decode_whole(item: MediaItem, size: tuple[int, int]) -> np.ndarray:
    """Every frame of a video (or the image), scaled to cover `size` as the decoding workers scale."""
    total = 1 if is_image_path(item.path) else frame_count(item.path)
    try:
        return decode_frames(item.path, list(range(total)), size)
    except SkipSample as short:  # the header promised more frames than the file holds
        if not getattr(short, "frames", 0):
            raise
        return decode_frames(item.path, list(range(short.frames)), size)


def _scaled(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(T, H, W, 3) uint8 scaled to cover `size` (area-averaging, like the decoders' AREA scaling)."""
    height, width = cover_size(frames.shape[1], frames.shape[2], size)
    if (height, width) == tuple(frames.shape[1:3]):
        return frames
    x = frames.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class FrameStore:
    """uint8 frames (T, H, W, 3) of every item, by path, on one device (or pinned host memory)."""

    def __init__(self, frames: dict[str, torch.Tensor], bad: dict[str, str]):
        self.frames, self.bad = frames, bad
        self.device = torch.device("cpu")
        self._room: float | None = None  # bytes of GPU memory the store may still take
        self._warned = False

    @property
    def nbytes(self) -> int:
        return sum(f.numel() for f in self.frames.values())

    @classmethod
    def decode(cls, items: list[MediaItem], size: tuple[int, int], threads: int = 0) -> FrameStore:
        """Decode every distinct file of `items` once, in threads (PyAV decodes without the GIL)."""
        paths = sorted({item.path for item in items})
        frames, bad = {}, {}

        def load(path: str):
            try:
                return path, torch.from_numpy(_decode_whole(MediaItem(path), size)), None
            except (MediaError, SkipSample, OSError, ValueError) as error:
                return path, None, str(error)

        with ThreadPoolExecutor(threads or min(16, os.cpu_count() or 1)) as pool:
            for path, pixels, error in pool.map(load, paths):
                if pixels is None:
                    bad[path] = error
                else:
                    frames[path] = pixels
        return cls(frames, bad)

    @classmethod
    def build(cls, items: list[MediaItem], size: tuple[int, int], device: torch.device) -> FrameStore:
        """Items of packs scaled from their frames (on `device`), the others decoded from their files;
        the store placed on `device` when it fits there (see `to`)."""
        in_packs = {item.path for item in items if PACK_SEPARATOR in item.path}
        store = cls.decode([item for item in items if item.path not in in_packs], size).to(device)
        for folder in sorted({path.split(PACK_SEPARATOR)[0] for path in in_packs}):
            _, frames = read_pack(folder)
            for key, pixels in frames.items():
                if key in in_packs:
                    store.frames[key] = store.place(_scaled(pixels.to(store.device), size))
        return store

    def to(self, device: torch.device) -> FrameStore:
        """The store on `device`; on a GPU, frames beyond its share of the free memory (DEVICE_SHARE)
        stay in pinned host memory, from where batches are copied asynchronously."""
        self.device = device
        self.frames = {key: self.place(pixels) for key, pixels in self.frames.items()}
        return self

    def place(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return pixels.cpu()
        if self._room is None:
            self._room = DEVICE_SHARE * torch.cuda.mem_get_info(self.device)[0]
        if pixels.numel() <= self._room:
            self._room -= pixels.numel()
            return pixels.to(self.device)
        if not self._warned:
            logger.warning("training data: the GPU's share of free memory for frames is full; the rest stays in "
                           "pinned host memory")
            self._warned = True
        return pixels.cpu().pin_memory()


def _crop_offsets(height: int, width: int, size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(0, height - size[0] + 1)), int(rng.integers(0, width - size[1] + 1))


class ResidentBatches(TrainingBatches):
    """`TrainingBatches` cut from a `FrameStore`: the same samples and crops, no decoding.

    A batch's `pixels` are (B, 3, T, H, W) uint8 on the store's device.
    """

    def __init__(self, plan: BatchPlan, videos: list[MediaItem], images: list[MediaItem],
                 settings: SampleSettings, store: FrameStore):
        super().__init__(plan, videos, images, settings)
        self.store = store
        self.bad.update(store.bad)

    def _pixels(self, item: MediaItem) -> torch.Tensor:
        try:
            return self.store.frames[item.path]
        except KeyError:
            raise MediaError(f"{item.path}: not in the resident frame store") from None

    def clip(self, item: MediaItem, stride: int, rng: np.random.Generator) -> torch.Tensor:
        frames = self._pixels(item)
        indices = clip_indices(len(frames), self.settings.frames, stride, rng)
        top, left = _crop_offsets(frames.shape[1], frames.shape[2], self.settings.size, rng)
        height, width = self.settings.size
        step = indices[1] - indices[0] if len(indices) > 1 else 1
        return self._on_device(frames[indices[0]: indices[-1] + 1: step, top: top + height, left: left + width])

    def frame(self, item: MediaItem, rng: np.random.Generator) -> torch.Tensor:
        frames = self._pixels(item)
        index = 0 if is_image_path(item.path) else int(rng.integers(0, len(frames)))
        top, left = _crop_offsets(frames.shape[1], frames.shape[2], self.settings.size, rng)
        height, width = self.settings.size
        return self._on_device(frames[index: index + 1, top: top + height, left: left + width])

    def _on_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """A no-op for frames on the device; frames kept in host memory are copied there."""
        return pixels.to(self.store.device, non_blocking=True)


class ResidentLoader:
    """Endless batches of one process from micro-batch `start` on (the `DataLoader` interface the
    trainer uses), cut on the store's device in the trainer's own thread."""

    def __init__(self, batches: ResidentBatches, start: int):
        self.batches, self.index = batches, start

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batches[self.batches.plan.spec(self.index)]
        self.index += 1
        return batch
