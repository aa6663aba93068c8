"""Encode, decode and reconstruct whole videos of any size and length, streaming, on bounded memory.

`VideoPipeline` holds a model, a text encoder and the chunking/tiling settings. It pads frames to
multiples of the model's compression and crops back, pads the frame count and trims it back,
runs temporal chunks (overlapping and cross-faded) and spatial tiles (overlapping, blended, with
GroupNorm statistics shared over the frame), and reads and writes files a chunk at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .chunking import ChunkSettings, window_starts, windowed_map
from .budget import LevelsWithinBudget
from .local_maps import levels_within, tiled_levels
from .device import resolve_device, resolve_precision
from .files import atomic_path, refuse_overwriting_input
from .memory import parse_size
from .models import CrossModalVAE
from .models.config import NOT_NETWORK
from .models.groupnorm import row_statistics
from .models.spatial import LocalMap
from .tiling import TileSettings
from .video_io import DecodeLog, EncodeSettings, MediaInfo, VideoWriter, iter_chunks, probe

LATENT_FORMAT = "cmvae-latent-1"


@dataclass
class PipelineSettings:
    """How a video runs through the model. Tile sizes are in pixels of the (resized) input."""

    chunk_frames: int = 16
    # frames shared by consecutive chunks, cross-faded; None: 4 for chunks of 8 frames or more, which
    # removes most of the flicker at chunk boundaries (docs/benchmarks.md), else 0
    chunk_overlap: int | None = None
    # bytes (or a size such as "6GB") the process may use; None: from the machine (cmvae.memory). Levels
    # of the model that do not fit run in bands of rows, exactly (cmvae.budget)
    memory_budget: int | str | None = None
    tile: int | None = None  # expert override of the budget: square tiles of this many pixels; 0: never tile
    tile_overlap: int = 64
    tile_norm: str = "exact"  # GroupNorm statistics in tiles: exact, first-pass or per-tile (cmvae.tiling)
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 where it is fast (GPUs, CPUs with native bfloat16), else float32
    resize: int | tuple[int, int] | None = None  # shorter side, or (width, height)
    stretch: bool = False  # with an exact (width, height): distort instead of crop to keep the aspect ratio

    def __post_init__(self) -> None:
        if self.memory_budget is not None:
            self.memory_budget = parse_size(self.memory_budget)
        if self.tile is not None:
            self.tiling  # noqa: B018 - validates the tile settings
        self.chunking  # noqa: B018

    @property
    def chunking(self) -> ChunkSettings:
        overlap = self.chunk_overlap
        if overlap is None:
            overlap = 4 if self.chunk_frames >= 8 else 0
        return ChunkSettings(self.chunk_frames, overlap)

    @property
    def tiling(self) -> TileSettings:
        return TileSettings(self.tile or 0, self.tile_overlap, self.tile_norm)


@dataclass
class EncodedVideo:
    """A latent and what decoding it back needs."""

    latent: torch.Tensor  # (1, zc, t, h, w), float32: the posterior's mean
    fps: Fraction
    width: int
    height: int
    frames: int
    is_image: bool
    caption: str = ""
    model_fingerprint: str = ""
    extra: dict = field(default_factory=dict)
    logvar: torch.Tensor | None = None  # the posterior's log-variance, to sample latents later

    @property
    def display_matrix(self) -> tuple[int, ...] | None:
        """The source video's rotation (`cmvae.video_io.DecodeLog`), where it had one."""
        return _matrix_from_text(self.extra.get("display_matrix"))

    def metadata(self) -> dict[str, str]:
        values = {"format": LATENT_FORMAT, "fps": str(self.fps), "width": str(self.width),
                  "height": str(self.height), "frames": str(self.frames), "is_image": str(int(self.is_image)),
                  "caption": self.caption, "model_fingerprint": self.model_fingerprint}
        return {**values, **{k: str(v) for k, v in self.extra.items()}}

    @classmethod
    def from_metadata(cls, latent: torch.Tensor, meta: dict[str, str]) -> EncodedVideo:
        known = {"format", "fps", "width", "height", "frames", "is_image", "caption", "model_fingerprint"}
        return cls(latent=latent, fps=Fraction(meta["fps"]), width=int(meta["width"]), height=int(meta["height"]),
                   frames=int(meta["frames"]), is_image=meta["is_image"] == "1", caption=meta.get("caption", ""),
                   model_fingerprint=meta.get("model_fingerprint", ""),
                   extra={k: v for k, v in meta.items() if k not in known})


def model_fingerprint(model: CrossModalVAE) -> str:
    """A short hash of the configuration and weights: latents are only decoded by the model that made them."""
    architecture = {k: v for k, v in model.cfg.to_dict().items() if k not in NOT_NETWORK}
    digest = hashlib.sha256(json.dumps(architecture, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames (n, H, W, 3) -> (1, 3, n, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0


def to_unit(video: torch.Tensor) -> np.ndarray:
    """(1, 3, n, H, W) in [-1, 1] -> float32 (n, H, W, 3) in [0, 1], not clamped."""
    return ((video[0].float().permute(1, 2, 3, 0) + 1.0) / 2.0).cpu().numpy()


def to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.round(unit * 255.0), 0, 255).astype(np.uint8)


def _resized_size(width: int, height: int, resize) -> tuple[int, int]:
    if resize is None:
        return width, height
    if isinstance(resize, int):
        scale = resize / min(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))
    return resize


def resize_frames(frames: torch.Tensor, resize, stretch: bool) -> torch.Tensor:
    """(1, 3, n, H, W) resized; an exact size keeps the aspect ratio by a centre crop unless `stretch`."""
    if resize is None:
        return frames
    height, width = frames.shape[-2:]
    target_w, target_h = _resized_size(width, height, resize)
    if (target_w, target_h) == (width, height):
        return frames
    if isinstance(resize, tuple) and not stretch:  # scale to cover, then crop the centre
        scale = max(target_w / width, target_h / height)
        cover_w, cover_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
        frames = _interpolate(frames, cover_h, cover_w)
        top, left = (cover_h - target_h) // 2, (cover_w - target_w) // 2
        return frames[..., top:top + target_h, left:left + target_w]
    return _interpolate(frames, target_h, target_w)


def _interpolate(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, c, n = frames.shape[:3]
    flat = frames.transpose(1, 2).reshape(b * n, c, *frames.shape[-2:])
    out = F.interpolate(flat, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return out.reshape(b, n, c, height, width).transpose(1, 2)


class _FrameCounter:
    """Counts the frames a stream delivered; the count is final once the stream is exhausted."""

    def __init__(self):
        self.count = 0
        self.done = False


class VideoPipeline:
    """A model with the settings to run it over whole videos and files.

    >>> pipe = VideoPipeline(load_model("cmvae-16z"), PipelineSettings(memory_budget="6GB"))
    >>> pipe.reconstruct("in.mp4", "out.mp4")

    `notify` receives one-line notes meant for the user (the memory budget, when a level does not
    fit whole).
    """

    def __init__(self, model: CrossModalVAE, settings: PipelineSettings | None = None, text_encoder=None,
                 progress: bool = False, notify: Callable[[str], None] | None = None):
        self.settings = settings or PipelineSettings()
        self.device = resolve_device(self.settings.device)
        self.precision = resolve_precision(self.settings.dtype, self.device)
        self.dtype, self.memory_format = self.precision.dtype, self.precision.memory_format
        self._fingerprint: str | None = None
        if next(model.parameters()).dtype != self.dtype:  # the fingerprint hashes the weights as loaded
            self._fingerprint = model_fingerprint(model)
        self.model = model.eval().requires_grad_(False).to(device=self.device, dtype=self.dtype,
                                                           memory_format=self.memory_format)
        if text_encoder is not None:
            self.model.set_text_encoder(text_encoder)
        self.progress = progress
        self.levels: LevelsWithinBudget | None = None
        if self.settings.tile is None:
            self.levels = levels_within(self.model, self.settings.memory_budget, self.device, notify)

    @property
    def spatial_factor(self) -> int:
        return self.model.cfg.spatial_compression

    @property
    def temporal_factor(self) -> int:
        return self.model.cfg.temporal_compression

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    # ---- text ---------------------------------------------------------------------------------

    def _text(self, caption: str | None) -> dict:
        """Caption embeddings, computed once per video, in the form `encode`/`decode` take."""
        if not self.model.cfg.has_text:
            return {}
        if self.model.text_encoder is None:
            from .text import default_text_encoder

            self.model.set_text_encoder(default_text_encoder(self.model.cfg.context_dim))
        context = self.model.text_context(1, captions=caption or "")
        return {"context": context.embeddings.to(self.dtype), "context_mask": context.mask}

    # ---- tensors: one chunk or tile at a time -------------------------------------------------

    def _encode_window(self, x: torch.Tensor, text: dict) -> torch.Tensor:
        """One chunk (or an image, T == 1: image mode) -> its posterior's moments (mean and
        log-variance along channels); each level of the spatial encoder runs whole, in bands or in
        tiles, as the memory budget (or the tile setting) says."""
        with row_statistics():
            return self.model.encode(x, local_map=self._tiler(), **text).latent_dist.parameters

    def _decode_window(self, z: torch.Tensor, text: dict, image_mode: bool) -> torch.Tensor:
        with row_statistics():
            return self.model.decode(z, image_mode=image_mode, local_map=self._tiler(), **text).sample

    def local_map(self) -> LocalMap | None:
        """What runs each level of the spatial encoder and decoder (`local_map` of `CrossModalVAE.encode`):
        None (whole), the memory budget's bands or tiles, or the set tiles."""
        return self._tiler()

    def _tiler(self) -> LocalMap | None:
        """`local_map` for the model: within the budget, or each level in tiles of the frame's tiling,
        scaled to the level, where a tile size is set."""
        if self.levels is not None:
            return self.levels
        return tiled_levels(self.model, self.settings.tiling) if self.settings.tiling.tile else None

    # ---- streams ------------------------------------------------------------------------------

    def _prepared(self, frames: Iterable[np.ndarray], counter: _FrameCounter) -> Iterator[torch.Tensor]:
        """uint8 chunks -> model-ready tensors: resized, padded to the spatial factor, and the stream's
        end padded with copies of the last frame to a multiple of the temporal factor."""
        last = None
        for chunk in frames:
            counter.count += len(chunk)
            x = resize_frames(to_tensor(chunk), self.settings.resize, self.settings.stretch)
            last = x = self._pad_spatial(x)
            yield self._to_model(x)
        counter.done = True
        if last is None:
            return
        missing = -counter.count % self.temporal_factor
        if missing:
            yield self._to_model(last[:, :, -1:].expand(-1, -1, missing, -1, -1))

    def _pad_spatial(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spatial_factor
        pad_h, pad_w = -x.shape[-2] % s, -x.shape[-1] % s
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h, 0, 0), mode="replicate")
        return x

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype, memory_format=self.memory_format)

    def encode_stream(self, frames: Iterable[np.ndarray], caption: str | None = None,
                      counter: _FrameCounter | None = None) -> Iterator[torch.Tensor]:
        """uint8 frame chunks (n, H, W, 3) of one video -> latent pieces (1, zc, t, h, w), streaming."""
        zc = self.model.cfg.latent_channels
        return (moments[:, :zc] for moments in self.moments_stream(frames, caption, counter))

    def moments_stream(self, frames: Iterable[np.ndarray], caption: str | None = None,
                       counter: _FrameCounter | None = None) -> Iterator[torch.Tensor]:
        """Like `encode_stream`, but the posterior's mean and log-variance (1, 2*zc, t, h, w)."""
        counter = counter or _FrameCounter()
        text = self._text(caption)
        chunks = self.settings.chunking
        with torch.inference_mode():
            yield from windowed_map(self._prepared(frames, counter),
                                    lambda x: self._encode_window(x, text).float(),
                                    chunks.frames, chunks.overlap)

    def decode_stream(self, latents: Iterable[torch.Tensor], caption: str | None = None
                      ) -> Iterator[torch.Tensor]:
        """Latent pieces -> decoded frame pieces (1, 3, n, H', W') in [-1, 1] (padded size), streaming."""
        text = self._text(caption)
        chunks = self.settings.chunking
        f = self.temporal_factor
        pieces = (z.to(device=self.device, dtype=self.dtype) for z in latents)
        with torch.inference_mode():
            yield from windowed_map(pieces, lambda z: self._decode_window(z, text, image_mode=False).float(),
                                    chunks.frames // f, chunks.overlap // f)

    # ---- arrays -------------------------------------------------------------------------------

    def encode_array(self, frames: np.ndarray, caption: str | None = None) -> torch.Tensor:
        """uint8 frames (T, H, W, 3) -> latent (1, zc, t, h, w) float32 on the CPU."""
        return torch.cat([z.cpu() for z in self.encode_stream(self._in_chunks(frames), caption)], dim=2)

    def decode_latent(self, latent: torch.Tensor, frames: int, height: int, width: int,
                      caption: str | None = None) -> np.ndarray:
        """Latent -> float32 frames (frames, height, width, 3) in [0, 1], cropped and trimmed."""
        pieces = self.decode_stream(self._latent_pieces(latent), caption)
        return np.concatenate([to_unit(p.cpu()) for p in pieces])[:frames, :height, :width]

    def reconstruct_array(self, frames: np.ndarray, caption: str | None = None) -> np.ndarray:
        """uint8 frames (T, H, W, 3) -> float32 (T, H, W, 3) in [0, 1] (not quantised, not clamped).

        A single frame (T == 1) runs in image mode."""
        if len(frames) == 1:
            return self._reconstruct_image(frames, caption)
        latents = self.encode_stream(self._in_chunks(frames), caption)
        out = np.concatenate([to_unit(p.cpu()) for p in self.decode_stream(latents, caption)])
        height, width = self._output_size(frames.shape[2], frames.shape[1])
        return out[: len(frames), :height, :width]

    def _reconstruct_image(self, frames: np.ndarray, caption: str | None) -> np.ndarray:
        text = self._text(caption)
        x = self._to_model(self._pad_spatial(resize_frames(to_tensor(frames), self.settings.resize,
                                                            self.settings.stretch)))
        with torch.inference_mode():
            z = self._encode_window(x, text)[:, : self.model.cfg.latent_channels]
            out = to_unit(self._decode_window(z, text, image_mode=True).float().cpu())
        height, width = self._output_size(frames.shape[2], frames.shape[1])
        return out[:, :height, :width]

    def chunk_boundaries(self, num_frames: int) -> list[int]:
        """Frame indices where a temporal chunk starts (after the first), for boundary metrics."""
        padded = num_frames + (-num_frames % self.temporal_factor)
        return [s for s in window_starts(padded, self.settings.chunk_frames, self.settings.chunking.overlap)[1:]
                if s < num_frames]

    def _in_chunks(self, frames: np.ndarray) -> Iterator[np.ndarray]:
        step = self.settings.chunk_frames
        return (frames[i:i + step] for i in range(0, len(frames), step))

    def _latent_pieces(self, latent: torch.Tensor) -> Iterator[torch.Tensor]:
        step = self.settings.chunk_frames // self.temporal_factor
        return (latent[:, :, i:i + step] for i in range(0, latent.shape[2], step))

    def _output_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of the output: the input's, or its resized size."""
        width, height = _resized_size(width, height, self.settings.resize)
        return height, width

    # ---- files --------------------------------------------------------------------------------

    def reconstruct(self, source: str | Path, target: str | Path, caption: str | None = None,
                    side_by_side: str | Path | None = None, encode_settings: EncodeSettings | None = None
                    ) -> MediaInfo:
        """Reconstruct a video or image file into `target`, keeping size, frame count, frame rate and
        rotation; with `side_by_side` (a path), also write the input and the output next to each other.
        What decoding met (a damaged file, variable frame rate) is added to the returned `notes`."""
        for output in filter(None, (target, side_by_side)):
            refuse_overwriting_input(output, source)
        info = probe(source)
        if info.is_image:
            frames = next(iter_chunks(source, 1))
            out = to_uint8(self.reconstruct_array(frames, caption))
            with contextlib.ExitStack() as stack:
                writer, pair = self._writers(stack, target, side_by_side, info.fps, encode_settings)
                writer.write(out)
                if pair is not None:
                    pair.write(self._side_by_side(frames, out))
            return info
        counter, log = _FrameCounter(), DecodeLog()
        inputs: deque[np.ndarray] = deque()

        def remember(chunks):
            for chunk in chunks:
                if side_by_side:
                    inputs.extend(chunk)
                yield chunk

        chunks = iter_chunks(source, self.settings.chunk_frames, log)
        latents = self.encode_stream(remember(chunks), caption, counter)
        height, width = self._output_size(info.width, info.height)
        written = 0
        with contextlib.ExitStack() as stack:
            writer, pair = self._writers(stack, target, side_by_side, info.fps, encode_settings)
            bar = stack.enter_context(self._bar(info, "reconstruct"))
            for piece in self.decode_stream(latents, caption):
                out = to_uint8(to_unit(piece.cpu()))[:, :height, :width]
                if counter.done:
                    out = out[: max(0, counter.count - written)]
                for each in filter(None, (writer, pair)):  # decoded by now: the first frame's rotation
                    each.display_matrix = log.display_matrix
                writer.write(out)
                if pair is not None:
                    pair.write(self._side_by_side(np.stack([inputs.popleft() for _ in range(len(out))]), out))
                written += len(out)
                bar.update(len(out))
        info.notes.extend(log.notes(info))
        info.frame_count = counter.count
        return info

    @staticmethod
    def _writers(stack: contextlib.ExitStack, target, side_by_side, fps, settings):
        """The output's writer, and the side-by-side's (or None), both entered on `stack`."""
        writer = stack.enter_context(VideoWriter(target, fps, settings))
        pair = stack.enter_context(VideoWriter(side_by_side, fps, settings)) if side_by_side else None
        return writer, pair

    def _side_by_side(self, inputs: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        if inputs.shape[1:3] != outputs.shape[1:3]:  # resized: show the input at the output's size
            resized = resize_frames(to_tensor(inputs), self.settings.resize, self.settings.stretch)
            inputs = to_uint8(to_unit(resized))
        return np.concatenate([inputs, outputs], axis=2)

    def _bar(self, info: MediaInfo, label: str):
        return tqdm(total=info.frame_count, desc=f"{label} {info.path.name}", unit="frame",
                    disable=not self.progress, leave=False)

    def encode(self, source: str | Path, caption: str | None = None) -> EncodedVideo:
        """A video or image file -> its latent (and log-variance) and what decoding needs."""
        info = probe(source)
        counter, log = _FrameCounter(), DecodeLog()
        if info.is_image:
            frames = next(iter_chunks(source, 1))
            text = self._text(caption)
            x = self._to_model(self._pad_spatial(resize_frames(to_tensor(frames), self.settings.resize,
                                                                self.settings.stretch)))
            with torch.inference_mode():
                moments = self._encode_window(x, text).float().cpu()
            counter.count = 1
        else:
            with self._bar(info, "encode") as bar:
                pieces = []
                chunks = iter_chunks(source, self.settings.chunk_frames, log)
                for piece in self.moments_stream(chunks, caption, counter):
                    pieces.append(piece.cpu())
                    bar.update(piece.shape[2] * self.temporal_factor)
            moments = torch.cat(pieces, dim=2)
        latent, logvar = moments.chunk(2, dim=1)
        height, width = self._output_size(info.width, info.height)
        extra = {"chunk_frames": self.settings.chunk_frames, "chunk_overlap": self.settings.chunking.overlap,
                 "dtype": self.precision.dtype_name, "notes": "; ".join(info.notes + log.notes(info))}
        if log.display_matrix:
            extra["display_matrix"] = " ".join(str(v) for v in log.display_matrix)
        return EncodedVideo(latent=latent, logvar=logvar, fps=info.fps, width=width, height=height,
                            frames=counter.count,
                            is_image=info.is_image, caption=caption or "", model_fingerprint=self.fingerprint,
                            extra=extra)

    def decode(self, encoded: EncodedVideo, target: str | Path, encode_settings: EncodeSettings | None = None,
               check_model: bool = True) -> Path:
        """Write the video or image a latent encodes, at its original size, length and frame rate."""
        if check_model and encoded.model_fingerprint and encoded.model_fingerprint != self.fingerprint:
            raise ValueError(f"this latent was made by a different model (fingerprint "
                             f"{encoded.model_fingerprint}, this model is {self.fingerprint}); decode it with "
                             "the model that encoded it")
        if encoded.latent.shape[1] != self.model.cfg.latent_channels:
            raise ValueError(f"latent has {encoded.latent.shape[1]} channels, the model expects "
                             f"{self.model.cfg.latent_channels}")
        if encoded.is_image:
            text = self._text(encoded.caption)
            with torch.inference_mode():
                z = encoded.latent.to(device=self.device, dtype=self.dtype)
                out = to_unit(self._decode_window(z, text, image_mode=True).float().cpu())
            frames = to_uint8(out)[:, :encoded.height, :encoded.width]
            with VideoWriter(target, encoded.fps) as writer:
                writer.write(frames)
            return Path(target)
        written = 0
        with VideoWriter(target, encoded.fps, encode_settings, display_matrix=encoded.display_matrix) as writer:
            for piece in self.decode_stream(self._latent_pieces(encoded.latent), encoded.caption):
                out = to_uint8(to_unit(piece.cpu()))[: encoded.frames - written, :encoded.height, :encoded.width]
                writer.write(out)
                written += len(out)
        return Path(target)



def save_latent(encoded: EncodedVideo, path: str | Path) -> Path:
    """Write a latent file (safetensors: the latent, optionally its log-variance, and metadata), atomically."""
    from safetensors.torch import save_file

    from safetensors import SafetensorError

    tensors = {"latent": encoded.latent.contiguous()}
    if encoded.logvar is not None:
        tensors["logvar"] = encoded.logvar.contiguous()
    with atomic_path(path) as temp:
        try:
            save_file(tensors, temp, metadata=encoded.metadata())
        except SafetensorError as error:  # a full disk, say; its message does not name the file
            raise OSError(f"cannot write {path}: {error}") from None
    return Path(path)


def load_latent(path: str | Path) -> EncodedVideo:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"latent file not found: {path}")
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a latent file written by `cmvae encode` ({error})") from None
    if meta.get("format") != LATENT_FORMAT or "latent" not in tensors:
        raise ValueError(f"{path} is not a latent file written by `cmvae encode`")
    problem = _latent_problem(tensors, meta)
    if problem:
        raise ValueError(f"{path} is damaged: {problem}")
    encoded = EncodedVideo.from_metadata(tensors["latent"], meta)
    encoded.logvar = tensors.get("logvar")
    return encoded


def _latent_problem(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str | None:
    """What is wrong with a latent file's contents, in words; None when decoding can rely on them."""
    missing = [key for key in ("fps", "width", "height", "frames", "is_image") if key not in meta]
    if missing:
        return f"no {', '.join(missing)} in its metadata"
    try:
        fps = Fraction(meta["fps"])
        sizes = {key: int(meta[key]) for key in ("width", "height", "frames")}
        matrix = _matrix_from_text(meta.get("display_matrix"))
    except (ValueError, ZeroDivisionError):
        return "its fps, width, height, frames or display_matrix is not a number"
    if fps <= 0 or min(sizes.values()) < 1:
        return f"fps {meta['fps']}, width, height and frames {sizes} must be positive"
    latent = tensors["latent"]
    if latent.dim() != 5 or latent.shape[0] != 1 or not latent.is_floating_point():
        return f"its latent has shape {tuple(latent.shape)} ({latent.dtype}), not (1, channels, t, h, w) floats"
    if not torch.isfinite(latent).all():
        return "its latent holds NaN or infinite values"
    if matrix is not None and len(matrix) != 9:
        return "its display_matrix does not have 9 entries"
    return None


def _matrix_from_text(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(v) for v in text.split()) if text else None
