"""Where the model looks for each caption word: cross-attention maps, recorded while a clip runs through it.

`attention_maps(model, frames, caption, text_encoder)` runs a clip through encoder and decoder in
temporal chunks and, for each chosen word, records the softmax weight every patch of every
cross-attention layer gives to the word's tokens (summed over them), averaged over heads. Layers are
averaged per side (encoder: spatial encoder and temporal encoder; decoder: temporal decoder and spatial
decoder) on a common grid of `cell x cell`-pixel squares; `per_layer=True` keeps every layer's map too.
`write_outputs` writes overlay PNGs, an overlay video and the raw maps (safetensors). See
docs/visualisation.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .chunking import ChunkSettings, window_starts
from .models import CrossModalVAE
from .models.attention import WHOLE_FRAME, CrossAttention, Region, recording_cross_attention
from .models.groupnorm import row_statistics
from .models.spatial import LocalMap

SIDES = ("encoder", "decoder")
DEFAULT_MEMORY_CAP = 2 * 2**30  # bytes the recorded maps may take


def select_words(caption_words: list[tuple[str, list[int]]], wanted: list[str] | None = None) -> dict[str, list[int]]:
    """Chosen words -> the token positions to sum, every occurrence of a repeated word included.

    `caption_words` is what `HFTextEncoder.words` returns; words match without regard to case. Without
    `wanted`, every word of the caption that has a letter or a digit, in order of first appearance."""
    tokens_of: dict[str, list[int]] = {}
    for word, positions in caption_words:
        tokens_of.setdefault(word.lower(), []).extend(positions)
    if wanted is None:
        wanted = [w for w in tokens_of if any(ch.isalnum() for ch in w)]
    wanted = list(dict.fromkeys(w.strip().lower() for w in wanted if w.strip()))
    if not tokens_of or not wanted:
        raise ValueError("the caption has no words to map; give a caption (--caption) with words")
    missing = [w for w in wanted if w not in tokens_of]
    if missing:
        known = ", ".join(tokens_of)
        raise ValueError(f"not in the caption: {', '.join(missing)} (the caption's words, as the tokenizer "
                         f"splits it and within its token limit: {known})")
    return {w: sorted(tokens_of[w]) for w in wanted}


def token_groups(words: dict[str, list[int]], length: int) -> torch.Tensor:
    """(length, words) matrix with a 1 where a token belongs to a word: probabilities @ it sums the word's tokens."""
    groups = torch.zeros(length, len(words))
    for column, positions in enumerate(words.values()):
        groups[positions, column] = 1.0
    return groups


def layer_names(model: torch.nn.Module) -> dict[CrossAttention, tuple[str, str]]:
    """Every cross-attention layer -> (side, its name in the model)."""
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, CrossAttention):
            names[module] = ("encoder" if name.startswith("encoder") else "decoder", name)
    return names


def map_cell(model: CrossModalVAE) -> int:
    """Side in pixels of the smallest patch any cross-attention layer sees: the maps' grid."""
    cfg = model.cfg
    spatial = [p * 2**level for level, p in enumerate(cfg.cross_attention_patch_sizes)]
    return min(spatial + [cfg.spatial_compression])


@dataclass
class AttentionMaps:
    """Per-word maps `(words, frames, rows, cols)` on a grid of `cell`-pixel squares (of the frame padded
    to the model's multiple), weights in [0, 1]: the mean over layers and heads of each patch's weight on
    the word."""

    words: list[str]
    encoder: torch.Tensor
    decoder: torch.Tensor
    cell: int
    height: int
    width: int
    caption: str
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    records: dict[str, torch.Tensor] = field(default_factory=dict)  # per side: layers that recorded each frame

    def side(self, name: str) -> torch.Tensor:
        return {"encoder": self.encoder, "decoder": self.decoder}[name]

    def upsampled(self, maps: torch.Tensor) -> torch.Tensor:
        """(..., rows, cols) -> (..., height, width): each cell covers its pixels."""
        pixels = maps.repeat_interleave(self.cell, dim=-2).repeat_interleave(self.cell, dim=-1)
        return pixels[..., : self.height, : self.width]


class MapRecorder:
    """Callback for `recording_cross_attention`: writes each layer's per-word weights into its own map.

    The caller sets `start` (the video frame where the running chunk begins) and `keep_from` (frames before
    it were recorded by an earlier, overlapping chunk). Where the model runs in tiles or bands, the layers
    say which part of the frame they saw and which part of that is kept (`Region`); only kept patches are
    written, and a patch that a later pass computes again (tiling with exact statistics reruns layers)
    overwrites its earlier value: every patch of every frame ends up recorded once per layer."""

    def __init__(self, names: dict[CrossAttention, tuple[str, str]], groups: torch.Tensor, frames: int,
                 rows: int, cols: int, memory_cap: int = DEFAULT_MEMORY_CAP):
        words = groups.shape[1]
        needed = (4 * words + 1) * frames * rows * cols * max(len(names), 1)
        if needed > memory_cap:
            raise ValueError(f"recording the maps needs {needed / 2**20:.0f} MiB, above the cap of "
                             f"{memory_cap / 2**20:.0f} MiB: choose fewer words, fewer frames or a smaller size "
                             "(--resize), or raise --max-record-memory")
        self.names, self.groups = names, groups
        self.shape = (words, frames, rows, cols)
        self.layers: dict[str, torch.Tensor] = {}
        self.written: dict[str, torch.Tensor] = {}  # per layer: (frames, rows, cols) patches recorded
        self.start = 0
        self.keep_from = 0
        self.chunk_frames = frames

    def __call__(self, layer: CrossAttention, probs: torch.Tensor, mask: torch.Tensor, grid,
                 region: Region = WHOLE_FRAME) -> None:
        if region.kept_rows is None:
            return
        _, name = self.names.get(layer, ("encoder", "layer"))
        b, t, rows, cols = grid
        kept = probs * (mask[:, None, None, :] > 0.5)  # padded and masked tokens: weight zero
        per_word = (kept @ self.groups.to(kept.device)).mean(dim=1)  # (b*t, patches, words), heads averaged
        per_word = per_word[:t].reshape(t, rows, cols, -1).permute(3, 0, 1, 2).cpu()  # first sample only
        first = max(self.keep_from, self.start)
        last = min(self.start + self.chunk_frames, self.shape[1])
        if last <= first:
            return
        (r0, r1), (c0, c1) = self._cells(region.rows, 2), self._cells(region.cols, 3)
        (k0, k1), (l0, l1) = self._cells(region.kept_rows, 2), self._cells(region.kept_cols, 3)
        factor = (r1 - r0) // rows  # map cells per patch side
        if factor < 1 or factor * rows != r1 - r0 or factor * cols != c1 - c0:
            raise ValueError(f"layer {name}: a {rows}x{cols} patch grid does not tile map cells {r0}-{r1} x {c0}-{c1}")
        maps = self._on_grid(per_word, factor)[:, first - self.start: last - self.start]
        target = self.layers.setdefault(name, torch.zeros(self.shape))
        target[:, first:last, k0:k1, l0:l1] = maps[:, :, k0 - r0:k1 - r0, l0 - c0:l1 - c0]
        written = self.written.setdefault(name, torch.zeros(self.shape[1:], dtype=torch.bool))
        written[first:last, k0:k1, l0:l1] = True

    def _cells(self, span: tuple[float, float], dim: int) -> tuple[int, int]:
        size = self.shape[dim]
        return round(span[0] * size), round(span[1] * size)

    def _on_grid(self, per_word: torch.Tensor, factor: int) -> torch.Tensor:
        """(words, t, rows, cols) of one layer -> (words, chunk frames, rows * factor, cols * factor)."""
        stride = self.chunk_frames // per_word.shape[1]
        return (per_word.repeat_interleave(stride, dim=1).repeat_interleave(factor, dim=2)
                .repeat_interleave(factor, dim=3))

    def means(self) -> dict[str, torch.Tensor]:
        """Per side, the mean over its layers (those that recorded anything)."""
        out = {}
        for side in SIDES:
            names = [name for s, name in self.names.values() if s == side and name in self.layers]
            total = torch.zeros(self.shape)
            for name in names:
                total += self.layers[name]
            out[side] = total / max(len(names), 1)
        return out

    def records(self) -> dict[str, torch.Tensor]:
        """Per side and frame: how many layers recorded every patch of the frame."""
        out = {}
        for side in SIDES:
            counts = torch.zeros(self.shape[1])
            for s, name in self.names.values():
                if s == side and name in self.written:
                    counts += self.written[name].flatten(1).all(dim=1)
            out[side] = counts
        return out


def _padded(frames: np.ndarray, multiple: int, time_multiple: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> (1, 3, T', H', W') in [-1, 1], edges repeated up to the model's multiples."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h, 0, 0), mode="replicate")
    missing = -x.shape[2] % time_multiple if x.shape[2] > 1 else 0
    if missing:
        x = torch.cat([x, x[:, :, -1:].expand(-1, -1, missing, -1, -1)], dim=2)
    return x


def attention_maps(model: CrossModalVAE, frames: np.ndarray, caption: str, text_encoder, words: list[str] | None = None,
                   per_layer: bool = False, chunk_frames: int = 16, chunk_overlap: int | None = None,
                   memory_cap: int = DEFAULT_MEMORY_CAP, local_map: LocalMap | None = None) -> AttentionMaps:
    """Per-word cross-attention maps of uint8 frames (T, H, W, 3) under `caption`, on the encoder and the
    decoder side. The clip runs in temporal chunks of `chunk_frames` (sharing `chunk_overlap` frames; a frame
    two chunks share is recorded by the first; None: 4 for chunks of 8 frames or more, as the pipeline), each chunk encoded and its latent's mean decoded, in the
    model's dtype and on its device; `local_map` runs the spatial levels (whole frames without it), e.g.
    `VideoPipeline.local_map()`: in bands within a memory budget, or in tiles."""
    if not model.cfg.has_text:
        raise ValueError("this model has no text cross-attention (context_dim is None); attention maps need a "
                         "text model, e.g. the tiny-text preset with the minilm text encoder")
    if text_encoder.dim != model.cfg.context_dim:
        raise ValueError(f"the text encoder gives {text_encoder.dim}-wide embeddings, the model expects "
                         f"{model.cfg.context_dim}")
    chosen = select_words(text_encoder.words(caption), words)
    overlap = chunk_overlap if chunk_overlap is not None else (4 if chunk_frames >= 8 else 0)
    settings = ChunkSettings(chunk_frames, overlap)
    cfg = model.cfg
    x = _padded(frames, cfg.spatial_compression, cfg.temporal_compression)
    cell = map_cell(model)
    embeddings, mask = text_encoder([caption])
    parameter = next(model.parameters())
    recorder = MapRecorder(layer_names(model), token_groups(chosen, embeddings.shape[1]),
                           x.shape[2], x.shape[3] // cell, x.shape[4] // cell, memory_cap)
    text = {"context": embeddings.to(parameter.device, parameter.dtype), "context_mask": mask.to(parameter.device)}
    starts = window_starts(x.shape[2], settings.frames, settings.overlap) if x.shape[2] > 1 else [0]
    with torch.inference_mode(), recording_cross_attention(recorder), row_statistics(local_map is not None):
        for start in starts:
            chunk = x[:, :, start:start + settings.frames].to(parameter.device, parameter.dtype)
            recorder.start, recorder.chunk_frames = start, chunk.shape[2]
            latent = model.encode(chunk, local_map=local_map, **text).latent_dist.mode()
            model.decode(latent, image_mode=chunk.shape[2] == 1, local_map=local_map, **text)
            recorder.keep_from = start + chunk.shape[2]
    means, records = recorder.means(), recorder.records()
    keep = len(frames)
    layers = {name: maps[:, :keep] for name, maps in recorder.layers.items()} if per_layer else {}
    return AttentionMaps(list(chosen), means["encoder"][:, :keep], means["decoder"][:, :keep], cell,
                         frames.shape[1], frames.shape[2], caption, layers,
                         {side: records[side][:keep] for side in SIDES})


# ---- pictures -----------------------------------------------------------------------------------------


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB through matplotlib's `inferno` (dark: no weight, yellow: most)."""
    from matplotlib import colormaps

    table = np.round(colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)
    return table[np.clip(np.round(values * 255), 0, 255).astype(np.int64)]


def overlay(frame: np.ndarray, weights: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """A uint8 frame (H, W, 3) with weights (H, W) in [0, 1] laid over it as a heat map."""
    mixed = (1 - opacity) * frame.astype(np.float32) + opacity * heat_colours(weights).astype(np.float32)
    return np.round(mixed).astype(np.uint8)


def _labelled(image: np.ndarray, label: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    bar = Image.new("RGB", (image.shape[1], 16), "black")
    ImageDraw.Draw(bar).text((3, 2), label, fill="white")
    return np.concatenate([np.asarray(bar), image], axis=0)


def scaled_for_display(maps: AttentionMaps) -> dict[str, torch.Tensor]:
    """Each side's maps stretched per word from their smallest to their largest value over the clip, so
    that differences show even where the weights are nearly even (the safetensors keep the raw weights)."""
    shown = {}
    for side in SIDES:
        values = maps.side(side).flatten(1)
        low, high = values.amin(dim=1), values.amax(dim=1)
        scale = (high - low).clamp(min=1e-12)
        shown[side] = (maps.side(side) - low[:, None, None, None]) / scale[:, None, None, None]
    return shown


def overlay_frame(maps: AttentionMaps, shown: dict[str, torch.Tensor], frame: np.ndarray, index: int) -> np.ndarray:
    """One frame of the overlay video: a row per side, a column per word, each labelled."""
    rows = []
    for side in SIDES:
        pixels = maps.upsampled(shown[side][:, index]).numpy()
        tiles = [_labelled(overlay(frame, pixels[w]), f"{side}: {word}") for w, word in enumerate(maps.words)]
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def _file_word(word: str) -> str:
    return re.sub(r"[^\w-]+", "_", word) or "word"


def write_outputs(maps: AttentionMaps, frames: np.ndarray, folder: str | Path, fps: Fraction = Fraction(24),
                  model_name: str = "") -> list[Path]:
    """Into `folder` (created if missing): `maps.safetensors` (raw maps, and per layer where recorded),
    `<side>_<word>.png` (the middle frame overlaid) and `overlay.mp4` (every frame, all words). Each file
    is written under a temporary name and renamed when complete."""
    from safetensors.torch import save_file

    from .files import atomic_path
    from .video_io import VideoWriter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    tensors = {"encoder": maps.encoder.contiguous(), "decoder": maps.decoder.contiguous(),
               **{f"layer.{name}": values.contiguous() for name, values in maps.layers.items()}}
    metadata = {"words": json.dumps(maps.words), "cell": str(maps.cell), "height": str(maps.height),
                "width": str(maps.width), "caption": maps.caption, "model": model_name,
                "layout": "(words, frames, rows, cols); a cell covers cell x cell pixels from the top left"}
    target = folder / "maps.safetensors"
    with atomic_path(target) as temp:
        save_file(tensors, temp, metadata=metadata)
    written.append(target)
    shown = scaled_for_display(maps)
    middle = len(frames) // 2
    for side in SIDES:
        pixels = maps.upsampled(shown[side][:, middle]).numpy()
        for w, word in enumerate(maps.words):
            target = folder / f"{side}_{_file_word(word)}.png"
            with VideoWriter(target) as writer:
                writer.write(overlay(frames[middle], pixels[w]))
            written.append(target)
    target = folder / "overlay.mp4"
    with VideoWriter(target, fps) as writer:
        for index, frame in enumerate(frames):
            writer.write(_even(overlay_frame(maps, shown, frame, index)))
    written.append(target)
    return written


def _even(image: np.ndarray) -> np.ndarray:
    """Pad to even sides (H.264 in 4:2:0, which every browser plays)."""
    pad_h, pad_w = image.shape[0] % 2, image.shape[1] % 2
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0))) if pad_h or pad_w else image
