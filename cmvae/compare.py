"""Several video autoencoders on the same clips: the same metrics, plus time and peak memory.

Our models (a preset, a weights file or a model folder) and diffusers video autoencoders from
local folders (`AutoencoderKLWan`, `AutoencoderKLCogVideoX`, `AutoencoderKLHunyuanVideo`,
`AutoencoderKLLTXVideo`, and `AutoencoderKL` frame by frame). Each clip is padded to the
model's frame-count rule by repeating its last frame and to its spatial multiple by repeating
edge pixels; the output is cut back to the clip before scoring.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .evaluation import METRIC_LABELS, ChunkStarts, Clip, Summary, VideoResult, VideoScorer, fixed_chunks
from .metrics import Lpips, quantize
from .reporting import atomic_write, csv_text, format_value, json_ready, markdown_table, save_figure
from .video_io import read_video

DIFFUSERS_CLASSES = ("AutoencoderKLWan", "AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo",
                     "AutoencoderKLLTXVideo", "AutoencoderKL")


@dataclass(frozen=True)
class FrameRule:
    """Frame counts a model takes: multiples of `multiple`, or 1 + a multiple where `plus_one` (causal models)."""

    multiple: int
    plus_one: bool = False

    def fit(self, count: int) -> int:
        """The smallest count this model takes that holds `count` frames."""
        base = count - 1 if self.plus_one else count
        return -(-base // self.multiple) * self.multiple + (1 if self.plus_one else 0)

    def describe(self) -> str:
        if self.multiple == 1:
            return "any number (frame by frame)"
        return f"{self.multiple}k+1" if self.plus_one else f"multiple of {self.multiple}"


Encode = Callable[[torch.Tensor, str | None], torch.Tensor]  # (1, 3, T, H, W) in [-1, 1] -> latent
Decode = Callable[[torch.Tensor, str | None], torch.Tensor]  # latent -> (1, 3, T, H, W)


@dataclass
class Autoencoder:
    name: str
    kind: str
    source: str
    module: torch.nn.Module
    frame_rule: FrameRule
    spatial_multiple: int
    encode: Encode
    decode: Decode
    chunk_starts: ChunkStarts | None = None  # where our model cuts a clip into chunks
    uses_captions: bool = False
    notes: list[str] = field(default_factory=list)


# ---- our models -----------------------------------------------------------------------------------


def wrap_ours(model, name: str, source: str, chunk_frames: int = 16) -> Autoencoder:
    """Our model as the authors ran it: non-overlapping chunks of `chunk_frames` frames, no tiling."""
    cfg = model.cfg
    step = cfg.temporal_compression
    if chunk_frames % step:
        raise ValueError(f"--chunk-frames must be a multiple of {step} for our models, got {chunk_frames}")
    latent_chunk = chunk_frames // step

    def encode(x: torch.Tensor, caption: str | None) -> torch.Tensor:
        parts = [model.encode(part, captions=caption if cfg.has_text else None).latent_dist.mode()
                 for part in x.split(chunk_frames, dim=2)]
        return torch.cat(parts, dim=2)

    def decode(z: torch.Tensor, caption: str | None) -> torch.Tensor:
        # image_mode=False: a one-latent-frame chunk is a 4-frame video, not an image
        parts = [model.decode(part, captions=caption if cfg.has_text else None, image_mode=False).sample
                 for part in z.split(latent_chunk, dim=2)]
        return torch.cat(parts, dim=2)

    notes = [f"run in non-overlapping chunks of {chunk_frames} frames (the authors' inference), no tiling"]
    return Autoencoder(name, "CrossModalVAE", source, model, FrameRule(step), cfg.spatial_compression, encode,
                       decode, fixed_chunks(chunk_frames), cfg.has_text, notes)


# ---- diffusers models -----------------------------------------------------------------------------


def _mode(output) -> torch.Tensor:
    return output.latent_dist.mode()


def wrap_diffusers(module, name: str, source: str, frame_batch: int = 8) -> Autoencoder:
    """A diffusers autoencoder with its frame-count rule (see `video_rules`)."""
    kind = type(module).__name__
    notes = ["diffusers defaults (no spatial tiling)"]
    if kind == "AutoencoderKL":
        encode, decode = _frame_by_frame(module, frame_batch)
        notes.append(f"an image autoencoder applied frame by frame, {frame_batch} frames a batch")
        return Autoencoder(name, kind, source, module, FrameRule(1), _downsampling(module), encode, decode, notes=notes)
    rule, spatial = video_rules(module, source)
    timestep = kind == "AutoencoderKLLTXVideo" and module.config.timestep_conditioning
    if timestep:
        notes.append("timestep-conditioned decoder run at timestep 0")

    def encode(x: torch.Tensor, caption: str | None) -> torch.Tensor:
        return _mode(module.encode(x))

    def decode(z: torch.Tensor, caption: str | None) -> torch.Tensor:
        if timestep:
            return module.decode(z, temb=torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)).sample
        return module.decode(z).sample

    return Autoencoder(name, kind, source, module, rule, spatial, encode, decode, notes=notes)


def video_rules(module, source: str) -> tuple[FrameRule, int]:
    """(frame rule, spatial multiple) of a diffusers video autoencoder, read off the installed diffusers code.

    - Wan: encodes the first frame, then 4 frames a step (hard-coded), so 4k+1.
    - CogVideoX: encodes 8 frames and decodes 2 latents a batch with a conv cache; only 1 and 8k+1
      frames come back at the length they went in.
    - HunyuanVideo, LTX-Video: causal, `temporal_compression_ratio` k+1 (4k+1, 8k+1 as released).
    """
    kind = type(module).__name__
    if kind == "AutoencoderKLWan":
        return FrameRule(4, True), module.spatial_compression_ratio
    if kind == "AutoencoderKLCogVideoX":
        return FrameRule(module.num_sample_frames_batch_size, True), _downsampling(module)
    if kind in ("AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo"):
        return FrameRule(module.temporal_compression_ratio, True), module.spatial_compression_ratio
    raise ValueError(f"{source}: {kind} is not a supported autoencoder; supported: {', '.join(DIFFUSERS_CLASSES)}")


def _downsampling(module) -> int:
    return 2 ** (len(module.config.block_out_channels) - 1)


def _frame_by_frame(module, frame_batch: int) -> tuple[Encode, Decode]:
    def encode(x: torch.Tensor, caption: str | None) -> torch.Tensor:
        frames = x[0].transpose(0, 1)  # (T, 3, H, W)
        latents = [_mode(module.encode(part)) for part in frames.split(frame_batch)]
        return torch.cat(latents).transpose(0, 1)[None]  # (1, c, T, h, w)

    def decode(z: torch.Tensor, caption: str | None) -> torch.Tensor:
        latents = z[0].transpose(0, 1)
        frames = [module.decode(part).sample for part in latents.split(frame_batch)]
        return torch.cat(frames).transpose(0, 1)[None]

    return encode, decode


# ---- loading by spec ------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, str]:
    """`NAME=SOURCE` or `SOURCE` -> (name, source); the name defaults to the source's file name."""
    name, sep, source = spec.partition("=")
    if sep and name and not os.path.exists(spec):
        return name, source
    return Path(spec.rstrip("/")).stem or spec, spec


def load_autoencoder(spec: str, device: torch.device, dtype: torch.dtype = torch.float32, chunk_frames: int = 16,
                     text_encoder=None) -> Autoencoder:
    """An autoencoder from a model folder (ours or diffusers'), a weights file (ours), `default` or a
    preset name (ours, random weights)."""
    from .checkpoints import resolve_model
    from .models import PRESETS

    name, source = parse_spec(spec)
    path = Path(source)
    if path.is_dir():
        kind = _folder_class(path)
        if kind != "CrossModalVAE":
            return _load_diffusers(path, kind, name, device, dtype)
    model = resolve_model(source, dtype=dtype).to(device=device, dtype=dtype).eval()
    notes = [f"preset {source!r} at RANDOM weights"] if source in PRESETS and not path.exists() else []
    if model.cfg.has_text:
        from .text import default_text_encoder

        model.set_text_encoder(text_encoder or default_text_encoder(model.cfg.context_dim))
    autoencoder = wrap_ours(model, name, source, chunk_frames)
    autoencoder.notes = notes + autoencoder.notes
    return autoencoder


def _folder_class(folder: Path) -> str:
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{folder} is not a model folder: it has no config.json")
    try:
        kind = json.loads(config.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{config} is not a JSON object") from None
    if kind != "CrossModalVAE" and kind not in DIFFUSERS_CLASSES:
        raise ValueError(f"{folder} holds a {kind or 'model of unknown class'}; supported: CrossModalVAE, "
                         f"{', '.join(DIFFUSERS_CLASSES)}")
    return kind


def _load_diffusers(folder: Path, kind: str, name: str, device: torch.device, dtype: torch.dtype) -> Autoencoder:
    import diffusers

    try:
        # low_cpu_mem_usage=False: the default asks for `accelerate` and warns without it
        module = getattr(diffusers, kind).from_pretrained(folder, torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"cannot load {kind} from {folder}: {error}") from None
    return wrap_diffusers(module.to(device).eval(), name, str(folder))


# ---- time and memory ------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int | None:
    try:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class MemoryMeter:
    """Peak memory over a stretch of work.

    CUDA: `torch.cuda.max_memory_allocated` after resetting the peak (tensors only, not the
    caching allocator's reserve). CPU: the process's resident-set high-water mark (VmHWM), reset
    first through /proc/self/clear_refs; where that is impossible, the lifetime peak
    (`resource.getrusage`), which says so in `method`.
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.method = "CUDA: torch.cuda.max_memory_allocated, peak reset before each encode and decode"
        elif self._reset_cpu_peak():
            self.method = "CPU: process resident set high-water mark (VmHWM), reset before each encode and decode"
        else:
            self.method = "CPU: process lifetime peak RSS (getrusage ru_maxrss); it could not be reset per model"
        self._base = 0

    @staticmethod
    def _reset_cpu_peak() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return _status_kib("VmHWM") is not None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._reset_cpu_peak()
            self._base = (_status_kib("VmRSS") or 0) * 1024

    def stop(self) -> tuple[int, int]:
        """(peak bytes, peak minus the amount in use at `start`)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _status_kib("VmHWM")
            peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, max(peak - self._base, 0)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- running one model ----------------------------------------------------------------------------


@dataclass
class Usage:
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0
    encode_peak_bytes: int = 0
    decode_peak_bytes: int = 0
    encode_rise_bytes: int = 0  # peak minus the memory in use before the encode (weights, inputs)
    decode_rise_bytes: int = 0
    frames: int = 0
    padded_frames: int = 0
    latent_shape: list[int] | None = None
    input_values: int = 0
    latent_values: int = 0

    def add_peaks(self, encode: tuple[int, int], decode: tuple[int, int]) -> None:
        self.encode_peak_bytes = max(self.encode_peak_bytes, encode[0])
        self.encode_rise_bytes = max(self.encode_rise_bytes, encode[1])
        self.decode_peak_bytes = max(self.decode_peak_bytes, decode[0])
        self.decode_rise_bytes = max(self.decode_rise_bytes, decode[1])


def to_model_input(frames: np.ndarray, autoencoder: Autoencoder) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> (1, 3, T', H', W') in [-1, 1], padded to the model's rules."""
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    count, height, width = x.shape[2:]
    extra = autoencoder.frame_rule.fit(count) - count
    if extra:
        x = torch.cat([x, x[:, :, -1:].expand(-1, -1, extra, -1, -1)], dim=2)
    multiple = autoencoder.spatial_multiple
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h, 0, 0), mode="replicate")
    return x


def _timed(work: Callable[[], torch.Tensor], device: torch.device,
           meter: MemoryMeter | None) -> tuple[torch.Tensor, float, tuple[int, int]]:
    """Run `work`; its result, wall-clock seconds and (peak, rise) memory in bytes."""
    if meter is not None:
        meter.start()
    _synchronize(device)
    start = time.perf_counter()
    result = work()
    _synchronize(device)
    seconds = time.perf_counter() - start
    return result, seconds, meter.stop() if meter is not None else (0, 0)


def reconstruct(autoencoder: Autoencoder, frames: np.ndarray, caption: str | None, device: torch.device,
                dtype: torch.dtype, usage: Usage | None = None, meter: MemoryMeter | None = None) -> np.ndarray:
    """Encode and decode one clip, timing each half; float (T, H, W, 3) on [0, 1] (not clamped)."""
    count, height, width = frames.shape[:3]
    x = to_model_input(frames, autoencoder).to(device=device, dtype=dtype)
    with torch.no_grad():
        latent, encode_seconds, encode_peak = _timed(lambda: autoencoder.encode(x, caption), device, meter)
        output, decode_seconds, decode_peak = _timed(lambda: autoencoder.decode(latent, caption), device, meter)
    if output.shape[2:] != x.shape[2:]:
        raise ValueError(f"{autoencoder.name}: {autoencoder.kind} returned {tuple(output.shape[2:])} (frames, height, "
                         f"width) for input {tuple(x.shape[2:])}; its frame rule is not "
                         f"{autoencoder.frame_rule.describe()} as cmvae assumed")
    if usage is not None:
        usage.encode_seconds += encode_seconds
        usage.decode_seconds += decode_seconds
        usage.add_peaks(encode_peak, decode_peak)
        usage.frames += count
        usage.padded_frames += x.shape[2] - count
        usage.latent_shape = usage.latent_shape or list(latent.shape)
        usage.input_values += x.numel()
        usage.latent_values += latent.numel()
    output = output[0, :, :count, :height, :width].float().cpu()
    return ((output.permute(1, 2, 3, 0) + 1.0) / 2.0).numpy()


# ---- the comparison -------------------------------------------------------------------------------


KeepOutputs = Callable[[str, Clip, np.ndarray], None]


@dataclass
class CompareSettings:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    chunk_frames: int = 16  # our models' chunk length
    warmup: int = 1  # untimed encode+decode runs of the first clip per model
    max_frames: int | None = None
    float_scoring: bool = False

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"warmup must be 0 or more, got {self.warmup}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {self.max_frames}")


@dataclass
class ModelResult:
    name: str
    kind: str
    source: str
    parameters: int
    frame_rule: str
    spatial_multiple: int
    usage: Usage
    videos: list[VideoResult]
    notes: list[str]

    @property
    def pooled(self) -> Summary:
        return Summary.pooled([f for v in self.videos for f in v.frames])

    @property
    def per_video_mean(self) -> Summary:
        return Summary.mean_of([v.summary() for v in self.videos])

    def row(self) -> dict:
        usage = self.usage
        per_frame = 1000.0 / usage.frames if usage.frames else math.nan
        return {
            "model": self.name, "class": self.kind, "source": self.source, "parameters": self.parameters,
            "frame_rule": self.frame_rule, "spatial_multiple": self.spatial_multiple,
            "frames": usage.frames, "padded_frames": usage.padded_frames,
            "compression": usage.input_values / usage.latent_values if usage.latent_values else None,
            **{f"pooled_{k}": v for k, v in asdict(self.pooled).items() if k != "frames"},
            **{f"per_video_{k}": v for k, v in asdict(self.per_video_mean).items() if k != "frames"},
            "encode_seconds": usage.encode_seconds, "decode_seconds": usage.decode_seconds,
            "encode_ms_per_frame": usage.encode_seconds * per_frame,
            "decode_ms_per_frame": usage.decode_seconds * per_frame,
            "encode_peak_mib": usage.encode_peak_bytes / 2**20, "decode_peak_mib": usage.decode_peak_bytes / 2**20,
            "encode_rise_mib": usage.encode_rise_bytes / 2**20, "decode_rise_mib": usage.decode_rise_bytes / 2**20,
        }


def run_model(autoencoder: Autoencoder, clips: list[tuple[Clip, np.ndarray]], settings: CompareSettings,
              lpips: Lpips | None, meter: MemoryMeter, keep_outputs: KeepOutputs | None = None) -> ModelResult:
    device = torch.device(settings.device)
    def caption(clip: Clip) -> str | None:
        return clip.caption if autoencoder.uses_captions else None

    for _ in range(settings.warmup):
        reconstruct(autoencoder, clips[0][1], caption(clips[0][0]), device, settings.dtype)
    usage, videos = Usage(), []
    for clip, frames in clips:
        output = reconstruct(autoencoder, frames, caption(clip), device, settings.dtype, usage, meter)
        output = np.clip(output, 0.0, 1.0) if settings.float_scoring else quantize(output)
        if keep_outputs is not None:
            keep_outputs(autoencoder.name, clip, output if output.dtype == np.uint8 else quantize(output))
        scorer = VideoScorer(clip.name, lpips, autoencoder.chunk_starts)
        for reference, reconstruction in zip(frames, output, strict=True):
            scorer.add(reference, reconstruction)
        videos.append(scorer.finish(str(clip.path), f"{autoencoder.name} in memory", clip.caption))
    parameters = sum(p.numel() for p in autoencoder.module.parameters())
    notes = list(autoencoder.notes)
    if usage.padded_frames:
        notes.append(f"{usage.padded_frames} frame(s) added over all clips (last frame repeated) to meet the frame "
                     "rule; cut off before scoring, but encoded and decoded (and timed)")
    return ModelResult(autoencoder.name, autoencoder.kind, autoencoder.source, parameters,
                       autoencoder.frame_rule.describe(), autoencoder.spatial_multiple, usage, videos, notes)


@dataclass
class CompareReport:
    scoring: str
    lpips: str
    memory: str
    timing: str
    clips: list[str]
    models: list[ModelResult]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "scoring": self.scoring, "lpips": self.lpips, "memory": self.memory, "timing": self.timing,
            "clips": self.clips,
            "models": [{**m.row(), "notes": m.notes, "latent_shape_first_clip": m.usage.latent_shape,
                        "per_video": {v.name: asdict(v.summary()) for v in m.videos}} for m in self.models],
            "notes": self.notes,
        }


def compare(clips: list[Clip], specs: list[str], settings: CompareSettings | None = None, lpips: Lpips | None = None,
            lpips_note: str = "LPIPS not computed", text_encoder=None,
            keep_outputs: KeepOutputs | None = None) -> CompareReport:
    """Run every model on every clip, one model in memory at a time; `keep_outputs(model name, clip, uint8
    frames)` receives each reconstruction (for the viewer page)."""
    settings = settings or CompareSettings()
    if not specs:
        raise ValueError("give at least one --model to compare")
    if not clips:
        raise ValueError("no clips to compare the models on")
    names = [parse_spec(spec)[0] for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two models share a name ({', '.join(names)}); name them with NAME=SOURCE")
    device = torch.device(settings.device)
    loaded = [(clip, read_video(clip.path, max_frames=settings.max_frames)) for clip in clips]
    meter = MemoryMeter(device)
    results = []
    for spec in specs:
        autoencoder = load_autoencoder(spec, device, settings.dtype, settings.chunk_frames, text_encoder)
        results.append(run_model(autoencoder, loaded, settings, lpips, meter, keep_outputs))
        del autoencoder
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    scoring = ("float: reconstructions clamped to [0,1], not rounded" if settings.float_scoring else
               "8-bit: reconstructions clamped to [0,1] and rounded to 8 bits, as a saved file holds them")
    timing = (f"wall-clock seconds of encode and of decode summed over all clips, {settings.warmup} untimed warm-up "
              f"run(s) per model first, {settings.device}, {str(settings.dtype).replace('torch.', '')}")
    return CompareReport(scoring, lpips_note, meter.method, timing, [c.name for c in clips], results)


# ---- writing --------------------------------------------------------------------------------------


TABLE_METRICS = ["psnr", "ssim", "ssim_standard", "lpips", "temporal_psnr", "boundary_psnr", "interior_psnr"]


def markdown_report(report: CompareReport) -> str:
    pooled = {m.name: m.pooled for m in report.models}
    metrics = [k for k in TABLE_METRICS if any(getattr(s, k) is not None for s in pooled.values())]
    header = ["model", "class", "frame rule", "frames (+padded)"] + [METRIC_LABELS[k] for k in metrics] + [
        "encode ms/frame", "decode ms/frame", "encode peak (rise) MiB", "decode peak (rise) MiB", "parameters"]
    rows = []
    for model in report.models:
        row = model.row()
        rows.append([model.name, model.kind, model.frame_rule, f"{model.usage.frames} (+{model.usage.padded_frames})"]
                    + [format_value(getattr(pooled[model.name], k), k) for k in metrics]
                    + [f"{row['encode_ms_per_frame']:.1f}", f"{row['decode_ms_per_frame']:.1f}",
                       f"{row['encode_peak_mib']:.0f} ({row['encode_rise_mib']:.0f})",
                       f"{row['decode_peak_mib']:.0f} ({row['decode_rise_mib']:.0f})", f"{model.parameters:,}"])
    notes = report.notes + [f"{m.name}: {note}" for m in report.models for note in m.notes]
    parts = ["# Autoencoder comparison", "",
             f"- Clips: {', '.join(report.clips)}", f"- Scoring: {report.scoring}; metrics pooled over all frames",
             f"- {report.lpips}", f"- Time: {report.timing}; ms/frame per scored frame",
             f"- Memory: {report.memory}; rise = peak minus the memory in use just before (weights, input)", "",
             markdown_table(header, rows)]
    if notes:
        parts += ["", "## Notes", "", *[f"- {note}" for note in notes]]
    return "\n".join(parts) + "\n"


def comparison_figure(report: CompareReport):
    from matplotlib.figure import Figure

    panels = [("PSNR (dB), pooled", lambda m: m.pooled.psnr),
              ("SSIM (authors), pooled", lambda m: m.pooled.ssim)]
    if any(m.pooled.lpips is not None for m in report.models):
        panels.append(("LPIPS (AlexNet), pooled", lambda m: m.pooled.lpips))
    panels += [("encode ms / frame", lambda m: m.row()["encode_ms_per_frame"]),
               ("decode ms / frame", lambda m: m.row()["decode_ms_per_frame"]),
               ("peak memory (MiB)", lambda m: max(m.row()["encode_peak_mib"], m.row()["decode_peak_mib"]))]
    figure = Figure(figsize=(3.2 * len(panels), 3.8))
    names = [m.name for m in report.models]
    for axes, (title, value) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        values = [value(m) for m in report.models]
        shown = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        axes.bar(range(len(names)), shown, color=[f"C{i}" for i in range(len(names))])
        axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
        axes.set_title(title, fontsize=10)
        axes.grid(axis="y", alpha=0.3)
    return figure


def write_reports(report: CompareReport, folder: str | os.PathLike) -> list[Path]:
    """compare.json, compare.csv, compare.md and compare.png in `folder`."""
    folder = Path(folder)
    return [
        atomic_write(folder / "compare.json", json.dumps(json_ready(report.to_dict()), indent=2) + "\n"),
        atomic_write(folder / "compare.csv", csv_text([m.row() for m in report.models])),
        atomic_write(folder / "compare.md", markdown_report(report)),
        save_figure(comparison_figure(report), folder / "compare.png"),
    ]
