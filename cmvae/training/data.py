"""Training data: lists of videos and images, clip sampling, PyAV decoding in DataLoader workers.

The order of the data is a pure function of the seed and the position in the stream of batches
(`BatchPlan`): batch `i` of every run with the same seed holds the same samples with the same crops,
however many processes share it. That makes resuming exact (restart the stream at the saved position)
and makes N processes with batch B see what one process with batch N*B sees, each process its own
slice. An unreadable or too-short file is replaced by another sample, counted and reported, never fatal.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..video_io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, MediaError, is_image_path, list_media, probe

logger = logging.getLogger(__name__)

VIDEO, IMAGE = "video", "image"
_MAX_REPLACEMENTS = 32  # unreadable samples in a row before the data is declared broken


@dataclass(frozen=True)
class MediaItem:
    path: str
    caption: str = ""


# ---- lists of files ---------------------------------------------------------------------------


def read_sources(sources: list[str], kind: str, root: str | None = None, path_column: str = "path",
                 caption_column: str = "caption") -> list[MediaItem]:
    """All items of `sources`: folders (captions from same-name .txt files), .txt lists (one path a line),
    CSV or JSONL lists with a path and a caption column (WebVid's videoid/page_dir/name work too)."""
    items = []
    for source in sources:
        found = _read_source(Path(source), kind, root, path_column, caption_column)
        if not found:
            raise ValueError(f"no {kind}s found in {source}")
        items += found
    return items


def _read_source(source: Path, kind: str, root: str | None, path_column: str, caption_column: str) -> list[MediaItem]:
    if source.is_dir() and _is_pack(source):
        return _pack_items(source, kind)
    if source.is_dir():
        wanted = IMAGE_SUFFIXES if kind == IMAGE else VIDEO_SUFFIXES
        return [MediaItem(str(p), _sidecar_caption(p)) for p in list_media(source) if p.suffix.lower() in wanted]
    if not source.is_file():
        raise ValueError(f"data source not found: {source}")
    base = Path(root) if root else source.parent
    suffix = source.suffix.lower()
    if suffix == ".txt":
        lines = [line.strip() for line in source.read_text().splitlines()]
        paths = [base / line for line in lines if line and not line.startswith("#")]
        return [MediaItem(str(p), _sidecar_caption(p)) for p in paths]
    if suffix == ".csv":
        with source.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    elif suffix in (".jsonl", ".json"):
        rows = _read_jsonl(source)
    else:
        raise ValueError(f"{source}: a data source is a folder, a .txt list, a .csv or a .jsonl file")
    return [_row_item(row, base, path_column, caption_column, source, number)
            for number, row in enumerate(rows, start=2 if suffix == ".csv" else 1)]


def _is_pack(folder: Path) -> bool:
    from .resident import is_pack

    return is_pack(folder)


def _pack_items(folder: Path, kind: str) -> list[MediaItem]:
    """The items of a frame pack (`cmvae.training.resident`): its images for images, else its videos."""
    from .resident import read_pack

    items, _ = read_pack(str(folder.resolve()))
    return [item for item in items if is_image_path(item.path) == (kind == IMAGE)]


def _read_jsonl(source: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(source.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}:{number}: not a JSON object ({error.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{source}:{number}: expected a JSON object per line")
        rows.append(row)
    return rows


def _row_item(row: dict, base: Path, path_column: str, caption_column: str, source: Path, number: int) -> MediaItem:
    if row.get(path_column):
        relative = str(row[path_column])
    elif row.get("videoid") and row.get("page_dir"):  # the WebVid layout: {page_dir}/{videoid}.mp4
        relative = f"{row['page_dir']}/{row['videoid']}.mp4"
    else:
        raise ValueError(f"{source}:{number}: no {path_column!r} column (set data.path_column), "
                         "nor WebVid's videoid and page_dir")
    caption = row.get(caption_column)
    if caption is None:
        caption = row.get("name", "")  # WebVid keeps captions in "name"
    return MediaItem(str(base / relative), str(caption or ""))


def _sidecar_caption(path: Path) -> str:
    text = path.with_suffix(".txt")
    return text.read_text().strip() if text.is_file() else ""


# ---- decoding -------------------------------------------------------------------------------


class SkipSample(Exception):
    """A sample that cannot make a training clip (unreadable, too short)."""


def clip_indices(total: int, frames: int, stride: int, rng: np.random.Generator | None) -> list[int]:
    """Frame numbers of a clip: every `stride`-th frame, or consecutive frames when the video is too short
    for that. A random start with `rng`, the centred clip without."""
    for step in dict.fromkeys((stride, 1)):
        span = (frames - 1) * step + 1
        if total >= span:
            start = int(rng.integers(0, total - span + 1)) if rng is not None else (total - span) // 2
            return list(range(start, start + span, step))
    raise SkipSample(f"too short: {total} frames, a clip needs {frames}")


media_info = functools.lru_cache(maxsize=4096)(probe)  # per worker: size and frame count of each file


@functools.lru_cache(maxsize=4096)
def frame_count(path: str) -> int:
    """Frames of a video: from its header, else by counting packets (no decoding)."""
    info = media_info(path)
    if info.frame_count:
        return info.frame_count
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as error:
        raise MediaError(f"{path}: cannot count frames ({error})") from None


class VideoEndedEarly(SkipSample):
    def __init__(self, frames: int, wanted: int):
        super().__init__(f"ended after {frames} frames, before frame {wanted}")
        self.frames = frames


def decode_frames(path: str, indices: list[int], size: tuple[int, int]) -> np.ndarray:
    """Frames `indices` (ascending) of a video or image, scaled so that they cover `size` (H, W):
    (n, h, w, 3) uint8 with h >= H, w >= W. Raises `VideoEndedEarly` when the video ends before them.

    A clip far into a long video starts with a seek to the keyframe before it rather than decoding
    every frame from the start."""
    info = media_info(path)  # clear MediaErrors for missing files, other kinds of file, no video stream
    height, width = cover_size(info.height, info.width, size)
    wanted = set(indices)
    frames: dict[int, np.ndarray] = {}
    seen = 0
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            numbering = _seek(container, stream, indices[0], info.fps)
            for frame in container.decode(stream):
                seen = numbering(frame, seen)
                if seen in wanted:
                    frames[seen] = frame.to_ndarray(format="rgb24", width=width, height=height,
                                                    interpolation="AREA")
                seen += 1
                if seen > indices[-1]:
                    break
    except av.FFmpegError as error:
        raise MediaError(f"{path}: decoding failed after {seen} frames ({error})") from None
    if len(frames) < len(wanted):
        raise VideoEndedEarly(seen, indices[-1])
    return np.stack([frames[i] for i in indices])


def cover_size(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """The smallest (height, width) of the same aspect ratio that covers `size`."""
    scale = max(size[0] / height, size[1] / width)
    return math.ceil(height * scale - 1e-6), math.ceil(width * scale - 1e-6)


SEEK_AFTER_SECONDS = 2.0  # clips starting later than this seek; earlier ones decode from the start


def _seek(container, stream, first: int, fps) -> callable:
    """Seek to the keyframe before frame `first` when that saves decoding; returns how to number the
    decoded frames: by counting from 0 without a seek, from their timestamps after one."""

    def counting(frame, seen: int) -> int:
        return seen

    if not fps or first < SEEK_AFTER_SECONDS * float(fps) or stream.time_base is None:
        return counting
    start = stream.start_time or 0
    frame_ticks = 1 / (float(fps) * float(stream.time_base))
    container.seek(int(start + (first - 1) * frame_ticks), stream=stream, backward=True, any_frame=False)

    def by_timestamp(frame, seen: int) -> int:
        if frame.pts is None:
            raise MediaError("frames without timestamps: cannot tell where a seek landed")
        return round((frame.pts - start) / frame_ticks)

    return by_timestamp


def crop(frames: np.ndarray, size: tuple[int, int], rng: np.random.Generator | None) -> np.ndarray:
    """A random (with `rng`) or centred `size` crop of (n, h, w, 3) frames."""
    height, width = frames.shape[1:3]
    if rng is None:
        top, left = (height - size[0]) // 2, (width - size[1]) // 2
    else:
        top, left = int(rng.integers(0, height - size[0] + 1)), int(rng.integers(0, width - size[1] + 1))
    return frames[:, top:top + size[0], left:left + size[1]]


def load_clip(item: MediaItem, frames: int, stride: int, size: tuple[int, int],
              rng: np.random.Generator | None) -> np.ndarray:
    """A clip (frames, H, W, 3) uint8 of a video: random position and crop with `rng`, centred without."""
    try:
        decoded = decode_frames(item.path, clip_indices(frame_count(item.path), frames, stride, rng), size)
    except VideoEndedEarly as short:
        # the header promised more frames than the file holds: choose again among those it has
        decoded = decode_frames(item.path, clip_indices(short.frames, frames, stride, rng), size)
    return crop(decoded, size, rng)


def load_frame(item: MediaItem, size: tuple[int, int], rng: np.random.Generator | None) -> np.ndarray:
    """One frame (1, H, W, 3): the image itself, or a random frame of a video."""
    index = 0
    if not is_image_path(item.path):
        total = frame_count(item.path)
        index = int(rng.integers(0, total)) if rng is not None else total // 2
    return crop(decode_frames(item.path, [index], size), size, rng)


# ---- the order of batches -------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSpec:
    """What one process loads for micro-batch `index` of the stream."""

    index: int
    kind: str  # VIDEO or IMAGE
    positions: tuple[int, ...]  # positions in the global stream of that kind (distinct across processes)


@dataclass(frozen=True)
class BatchPlan:
    """Which samples form micro-batch `index`, for process `rank` of `world`.

    Every `image_every`-th batch is an image batch. Each kind has its own stream of positions; position
    p is sample `permutation(epoch)[p % n]`, the permutation drawn from the seed and the epoch.
    """

    num_videos: int
    num_images: int
    batch_size: int
    image_batch_size: int
    image_every: int = 5
    world: int = 1
    rank: int = 0
    seed: int = 0

    def kind(self, index: int) -> str:
        return IMAGE if self.image_every and index % self.image_every == self.image_every - 1 else VIDEO

    def spec(self, index: int) -> BatchSpec:
        kind = self.kind(index)
        images_before = index // self.image_every if self.image_every else 0
        if kind == IMAGE:
            batch, number = self.image_batch_size, images_before
        else:
            batch, number = self.batch_size, index - images_before
        first = (number * self.world + self.rank) * batch
        return BatchSpec(index, kind, tuple(range(first, first + batch)))

    def sample(self, kind: str, position: int) -> int:
        count = self.num_images if kind == IMAGE else self.num_videos
        epoch, offset = divmod(position, count)
        return int(_permutation(self.seed, kind, epoch, count)[offset])


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, kind: str, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, 1 if kind == IMAGE else 0, epoch]).permutation(count)


_CAPTION_DROPOUT = 1_000_000  # a stream of randomness of its own, apart from the attempts


def item_rng(seed: int, kind: str, position: int, stream: int) -> np.random.Generator:
    """A random source of the sample at `position`: its clip, crop and replacement for each attempt
    (stream = attempt), its caption dropout (stream = _CAPTION_DROPOUT)."""
    return np.random.default_rng([seed, 1 if kind == IMAGE else 0, position, stream])


class PlanSampler(Sampler):
    """Yields the `BatchSpec`s of one process from micro-batch `start` on, without end."""

    def __init__(self, plan: BatchPlan, start: int = 0):
        self.plan, self.start = plan, start

    def __iter__(self) -> Iterator[BatchSpec]:
        index = self.start
        while True:
            yield self.plan.spec(index)
            index += 1


# ---- datasets -------------------------------------------------------------------------------


@dataclass
class SampleSettings:
    frames: int
    stride: int | list[int]  # a list: each clip draws one
    size: tuple[int, int]
    caption_dropout: float = 0.0
    seed: int = 0


class TrainingBatches(Dataset):
    """Map-style dataset whose keys are `BatchSpec`s: each key gives a whole batch, decoded in the worker.

    A batch is a dict: `pixels` uint8 (B, 3, T, H, W) (T == 1 for images), `captions`, `paths`,
    `index`, `kind`, and `skipped`: (path, reason) of every sample replaced in it.
    """

    def __init__(self, plan: BatchPlan, videos: list[MediaItem], images: list[MediaItem], settings: SampleSettings):
        self.plan, self.videos, self.settings = plan, videos, settings
        self.images = images or videos  # without image sources, image batches are single frames of videos
        if (plan.num_videos, plan.num_images) != (len(self.videos), len(self.images)):
            raise ValueError("the batch plan was made for other lists of samples")
        self.bad: dict[str, str] = {}  # per worker: files already found unreadable

    def __getitem__(self, spec: BatchSpec) -> dict:
        clips, captions, paths, skipped = [], [], [], []
        for position in spec.positions:
            pixels, item = self._load(spec.kind, position, skipped)
            clips.append(pixels)
            captions.append(self._caption(item, spec.kind, position))
            paths.append(item.path)
        return dict(pixels=torch.stack(clips).permute(0, 4, 1, 2, 3), captions=captions, paths=paths,
                    index=spec.index, kind=spec.kind, skipped=skipped)

    def _load(self, kind: str, position: int, skipped: list) -> tuple[torch.Tensor, MediaItem]:
        items = self.images if kind == IMAGE else self.videos
        s = self.settings
        sample = self.plan.sample(kind, position)
        for attempt in range(_MAX_REPLACEMENTS):
            rng = item_rng(s.seed, kind, position, attempt)
            if attempt:  # a replacement drawn from the position's own random source
                sample = int(rng.integers(0, len(items)))
            item = items[sample]
            if item.path in self.bad:
                skipped.append((item.path, self.bad[item.path]))
                continue
            try:
                if kind == IMAGE:
                    return self.frame(item, rng), item
                stride = s.stride if isinstance(s.stride, int) else int(rng.choice(s.stride))
                return self.clip(item, stride, rng), item
            except (MediaError, SkipSample, OSError, ValueError) as error:
                self.bad[item.path] = str(error)
                skipped.append((item.path, str(error)))
        raise RuntimeError(f"{_MAX_REPLACEMENTS} samples in a row could not be read (last: {skipped[-1][0]}: "
                           f"{skipped[-1][1]}); check the data lists")

    def clip(self, item: MediaItem, stride: int, rng: np.random.Generator) -> torch.Tensor:
        """A training clip (T, H, W, 3) uint8 of `item`, decoded now."""
        pixels = load_clip(item, self.settings.frames, stride, self.settings.size, rng)
        return torch.from_numpy(np.ascontiguousarray(pixels))

    def frame(self, item: MediaItem, rng: np.random.Generator) -> torch.Tensor:
        """A training image (1, H, W, 3) uint8 of `item`, decoded now."""
        return torch.from_numpy(np.ascontiguousarray(load_frame(item, self.settings.size, rng)))

    def _caption(self, item: MediaItem, kind: str, position: int) -> str:
        dropout = self.settings.caption_dropout
        if dropout and item_rng(self.settings.seed, kind, position, _CAPTION_DROPOUT).random() < dropout:
            return ""
        return item.caption


def make_loader(dataset: TrainingBatches, start: int, workers: int, prefetch: int,
                pin_memory: bool = False) -> DataLoader:
    """Batches of one process from micro-batch `start` on, decoded by `workers` processes; with
    `pin_memory` they arrive in page-locked memory, so that copies to a GPU run asynchronously."""
    return DataLoader(dataset, sampler=PlanSampler(dataset.plan, start), batch_size=None, num_workers=workers,
                      prefetch_factor=prefetch if workers else None, persistent_workers=False,
                      collate_fn=_keep, pin_memory=pin_memory)


def _keep(batch: dict) -> dict:
    return batch


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (on the pixels' device)."""
    return pixels.float() / 127.5 - 1.0


def validation_clips(items: list[MediaItem], frames: int, stride: int, size: tuple[int, int]) -> list[tuple[torch.Tensor, MediaItem]]:
    """Centred clips (3, T, H, W) in [-1, 1] of the readable ones among `items`."""
    clips = []
    for item in items:
        try:
            pixels = load_clip(item, frames, stride, size, rng=None)
        except (MediaError, SkipSample, OSError) as error:
            logger.warning("validation: skipped %s: %s", item.path, error)
            continue
        clips.append((to_unit_range(torch.from_numpy(np.ascontiguousarray(pixels)).permute(3, 0, 1, 2)), item))
    return clips
