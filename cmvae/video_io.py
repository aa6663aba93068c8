"""Reading and writing videos and images with PyAV, a chunk of frames at a time.

Frames are `uint8` arrays `(n, H, W, 3)` in RGB. Every input (any pixel format FFmpeg decodes:
grayscale, alpha, 10-bit and more) comes out as 8-bit RGB; what was converted is noted in
`MediaInfo.notes`. Outputs are written under a temporary name and renamed when complete, so a
failed or interrupted write never leaves a partial file.

Frames come out as stored, unrotated; a `DecodeLog` keeps what decoding met: the display matrix
(rotation) that writers copy to their outputs, frame timestamps that are not evenly spaced
(variable frame rate), and fewer frames than the container declares (a damaged file).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .files import atomic_path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif", ".m4v", ".mpg", ".mpeg", ".ogv", ".flv", ".wmv"}
WRITABLE_VIDEO_SUFFIXES = VIDEO_SUFFIXES - {".webm", ".gif", ".ogv"}  # these containers cannot hold H.264
WRITABLE_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
DEFAULT_FPS = Fraction(24)


class MediaError(ValueError):
    """A file that is missing, unreadable, or holds no decodable frames."""


@dataclass
class MediaInfo:
    path: Path
    width: int
    height: int
    fps: Fraction
    frame_count: int | None  # from the container; None when it does not say (count by decoding)
    is_image: bool
    pix_fmt: str
    notes: list[str] = field(default_factory=list)
    duration_frames: int | None = None  # the container's duration times the frame rate, where it gives one


@dataclass
class DecodeLog:
    """What decoding one video met; `iter_frames` fills it in as it goes."""

    frames: int = 0
    display_matrix: tuple[int, ...] | None = None  # of the first frame, FFmpeg's 3x3 layout
    shortest_step: float | None = None  # seconds between consecutive frames
    longest_step: float | None = None
    _last_time: float | None = None

    def add(self, frame: av.VideoFrame) -> None:
        if self.frames == 0:
            self.display_matrix = _display_matrix(frame)
        self.frames += 1
        if frame.time is None:
            return
        if self._last_time is not None:
            step = frame.time - self._last_time
            self.shortest_step = step if self.shortest_step is None else min(self.shortest_step, step)
            self.longest_step = step if self.longest_step is None else max(self.longest_step, step)
        self._last_time = frame.time

    def notes(self, info: MediaInfo) -> list[str]:
        """Warnings about the decoded video: uneven frame timing, fewer frames than declared."""
        notes = []
        fps = float(info.fps)
        if self.longest_step is not None and self.longest_step - self.shortest_step > 0.5 / fps:
            notes.append(f"frames {self.shortest_step * 1000:.0f} to {self.longest_step * 1000:.0f} ms apart "
                         f"(variable frame rate, or frames lost to damage): the output has the decoded frames at "
                         f"a constant {fps:g} fps, so its timing differs")
        if info.frame_count and self.frames < info.frame_count:
            notes.append(f"only {self.frames} of the {info.frame_count} frames the container declares could be "
                         "decoded: the file is damaged or truncated")
        elif not info.frame_count and info.duration_frames and self.frames < info.duration_frames - 1:
            notes.append(f"only {self.frames} of the about {info.duration_frames} frames the container's duration "
                         f"implies at {fps:g} fps could be decoded: the file is damaged or truncated, or its "
                         "frame rate varies")
        return notes


def _display_matrix(frame: av.VideoFrame) -> tuple[int, ...] | None:
    for side_data in frame.side_data:
        if side_data.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
            matrix = tuple(int(v) for v in np.frombuffer(bytes(side_data), dtype=np.int32))
            return None if matrix == IDENTITY_MATRIX else matrix
    return None


IDENTITY_MATRIX = (65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30)


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _open(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise MediaError(f"{path}: no such file")
    if path.is_dir():
        raise MediaError(f"{path} is a folder, not a video or image file")
    try:
        return av.open(str(path))
    except av.error.EOFError:
        raise MediaError(f"{path}: the file ends before any frame (empty or truncated)") from None
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise MediaError(f"{path}: not a video or image FFmpeg can read ({_reason(error)})") from None


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _conversion_notes(pix_fmt: str) -> list[str]:
    """What converting this pixel format to 8-bit RGB changes, in words."""
    try:
        fmt = av.VideoFormat(pix_fmt)
    except (ValueError, av.FFmpegError):
        return []
    colour = [c for c in fmt.components if not c.is_alpha]
    notes = []
    if len(colour) == 1 and not fmt.has_palette:
        notes.append(f"grayscale input ({pix_fmt}) converted to RGB")
    if any(c.is_alpha for c in fmt.components):
        notes.append(f"alpha channel of {pix_fmt} input dropped")
    if max(c.bits for c in fmt.components) > 8:
        notes.append(f"high bit depth input ({pix_fmt}) converted to 8-bit RGB")
    return notes


def probe(path: str | os.PathLike) -> MediaInfo:
    """Size, frame rate and frame count of a video or image, without decoding the whole file."""
    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "nothing"
            raise MediaError(f"{path}: no video stream (the file holds {kinds})")
        stream = container.streams.video[0]
        context = stream.codec_context
        width, height, pix_fmt = context.width, context.height, context.pix_fmt or ""
        if not width or not height:
            first = _first_frame(container, stream, path)
            width, height, pix_fmt = first.width, first.height, first.format.name
        fps = stream.average_rate or stream.guessed_rate or DEFAULT_FPS
        frames = stream.frames or None
        image = is_image_path(path)
        duration = container.duration / av.time_base if container.duration else None
    duration_frames = round(duration * fps) if duration and not image else None
    return MediaInfo(path, width, height, Fraction(fps), 1 if image else frames, image, pix_fmt,
                     _conversion_notes(pix_fmt), duration_frames)


def _first_frame(container, stream, path: Path) -> av.VideoFrame:
    try:
        for frame in container.decode(stream):
            return frame
    except av.FFmpegError as error:
        raise MediaError(f"{path}: cannot decode ({_reason(error)})") from None
    raise MediaError(f"{path}: the video has no frames")


def iter_frames(path: str | os.PathLike, log: DecodeLog | None = None) -> Iterator[np.ndarray]:
    """Every frame as an 8-bit RGB array (H, W, 3), decoded one at a time; `log` notes what decoding met."""
    path = Path(path)
    count = 0
    log = log or DecodeLog()
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                count += 1
                log.add(frame)
                yield frame.to_ndarray(format="rgb24")
        except av.FFmpegError as error:
            if count == 0:
                raise MediaError(f"{path}: cannot decode ({_reason(error)})") from None
            raise MediaError(f"{path}: decoding failed after {count} frames, the file is truncated or corrupt "
                             f"({_reason(error)})") from None
    if count == 0:
        raise MediaError(f"{path}: the video has no frames")


def iter_chunks(path: str | os.PathLike, chunk: int, log: DecodeLog | None = None) -> Iterator[np.ndarray]:
    """Frames in chunks of `chunk` (the last may be shorter), each (n, H, W, 3) uint8."""
    buffer = []
    for frame in iter_frames(path, log):
        buffer.append(frame)
        if len(buffer) == chunk:
            yield np.stack(buffer)
            buffer = []
    if buffer:
        yield np.stack(buffer)


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """All frames (or the first `max_frames`) at once: (T, H, W, 3) uint8. For short clips and tests."""
    frames = []
    for frame in iter_frames(path):
        frames.append(frame)
        if max_frames is not None and len(frames) >= max_frames:
            break
    return np.stack(frames)


@dataclass
class EncodeSettings:
    """H.264 by default (`crf`: lower is better, 0-51); `lossless` writes RGB H.264 at qp 0, exact."""

    crf: int = 18
    lossless: bool = False
    preset: str = "medium"


def output_name_problem(path: str | os.PathLike) -> str | None:
    """Why a writer cannot write `path`, by its name; None when it can."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.name or not path.stem:
        return f"cannot write {str(path)!r}: give a file name"
    if suffix in WRITABLE_IMAGE_SUFFIXES or suffix in WRITABLE_VIDEO_SUFFIXES:
        return None
    videos, images = ", ".join(sorted(WRITABLE_VIDEO_SUFFIXES)), ", ".join(sorted(WRITABLE_IMAGE_SUFFIXES))
    kind = f"{suffix} files" if suffix else "a name without an extension"
    return f"cannot write {path}: {kind} cannot be written; use a video ({videos}) or an image ({images})"


class VideoWriter:
    """Writes frames as they come to `path` (H.264 mp4 by default), atomically.

    Use as a context manager: on success the file appears under its name, on an exception the
    temporary file is removed. An image path (`.png`, ...) takes exactly one frame. A
    `display_matrix` (as `DecodeLog` reads it) set before the first frame is written into the video.
    """

    def __init__(self, path: str | os.PathLike, fps: Fraction = DEFAULT_FPS,
                 settings: EncodeSettings | None = None, display_matrix: tuple[int, ...] | None = None):
        self.path = Path(path)
        self.fps = Fraction(fps)
        self.settings = settings or EncodeSettings()
        self.display_matrix = display_matrix
        self.frames_written = 0
        self._container = None
        self._stream = None
        self._temp: Path | None = None
        self._atomic = None

    def __enter__(self) -> VideoWriter:
        problem = output_name_problem(self.path)
        if problem:
            raise MediaError(problem)
        if not self.path.parent.is_dir():
            raise MediaError(f"cannot write {self.path}: folder {self.path.parent} does not exist")
        self._atomic = atomic_path(self.path)
        try:
            self._temp = self._atomic.__enter__()
        except OSError as error:
            raise MediaError(str(error)) from None
        return self

    def write(self, frames: np.ndarray) -> None:
        """Append frames (n, H, W, 3) uint8 RGB (or one frame (H, W, 3))."""
        frames = frames[None] if frames.ndim == 3 else frames
        try:
            for frame in frames:
                if self._stream is None:
                    self._start(frame.shape[1], frame.shape[0])
                video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                for packet in self._stream.encode(video_frame):
                    self._container.mux(packet)
                self.frames_written += 1
        except (av.FFmpegError, OSError) as error:
            raise self._failure(error) from None

    def _failure(self, error: Exception) -> MediaError:
        """The error in words that name the output, not the temporary file."""
        return MediaError(f"cannot write {self.path}: {_reason(error)}")

    def _start(self, width: int, height: int) -> None:
        image = is_image_path(self.path)
        fmt = "image2" if image else None
        self._container = av.open(str(self._temp), mode="w", format=fmt)
        if image:
            codec, pix_fmt, options = ("png", "rgb24", {}) if self.path.suffix.lower() == ".png" else \
                ("mjpeg", "yuvj444p", {"qscale": "2"})
            stream = self._container.add_stream(codec, rate=1)
        elif self.settings.lossless:
            codec, pix_fmt, options = "libx264rgb", "rgb24", {"qp": "0", "preset": self.settings.preset}
            stream = self._container.add_stream(codec, rate=self.fps)
        else:
            # 4:2:0 needs even sizes; odd-sized videos keep their size in 4:4:4
            pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
            codec, options = "libx264", {"crf": str(self.settings.crf), "preset": self.settings.preset}
            stream = self._container.add_stream(codec, rate=self.fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = options
        if self.display_matrix and not image and hasattr(stream, "set_display_matrix"):  # not in older PyAV
            stream.set_display_matrix(list(self.display_matrix))
        self._stream = stream

    def __exit__(self, exc_type, exc, tb) -> None:
        error = exc
        try:
            if error is None:
                error = self._completed()
        except BaseException as stop:  # Ctrl-C or SIGTERM while the file is being finished
            error = stop
            raise
        finally:
            if self._container is not None:
                with contextlib.suppress(Exception):
                    self._container.close()
            self._atomic.__exit__(type(error) if error else None, error, None)  # rename, or remove the temporary
        if error is not None and error is not exc:
            raise error

    def _completed(self) -> Exception | None:
        """Flush the encoder and close the file; what went wrong, if anything."""
        try:
            self._finish()
            if self._container is not None:
                self._container.close()
                self._container = None
        except (av.FFmpegError, OSError) as failure:
            return self._failure(failure)
        except Exception as failure:  # noqa: BLE001 - whatever failed, the partial file must go
            return failure
        if not self.frames_written:
            return MediaError(f"nothing to write to {self.path}: no frames")
        return None

    def _finish(self) -> None:
        if self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: Fraction = DEFAULT_FPS,
                settings: EncodeSettings | None = None) -> Path:
    """Write all frames (T, H, W, 3) uint8 at once."""
    with VideoWriter(path, fps, settings) as writer:
        writer.write(frames)
    return Path(path)


def list_media(folder: str | os.PathLike) -> list[Path]:
    """Videos and images in a folder (not recursive), sorted by name."""
    folder = Path(folder)
    suffixes = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
