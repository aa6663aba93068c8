"""Scoring reconstructions: two folders of videos, or a model on a dataset, with reports.

Each video is scored frame by frame (`VideoScorer`); the figures are then averaged two ways,
both named in every report:

- pooled: the mean over every frame of every video (the paper's way);
- per-video mean: the mean over videos of each video's own mean.

docs/evaluation.md states every metric and protocol precisely.
"""

from __future__ import annotations

import csv
import heapq
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .metrics import (Lpips, LpipsUnavailable, frame_psnr, frame_ssim, frame_ssim_standard, load_lpips, quantize,
                      temporal_psnr)
from .reporting import atomic_write, csv_text, format_value, json_ready, markdown_table, save_figure
from .video_io import EncodeSettings, iter_frames, list_media, probe, read_video, write_video

RECONSTRUCTED_SUFFIX = "_reconstructed"  # the authors' inference script names its outputs <name>_reconstructed.mp4

PROTOCOL = {
    "psnr": "per frame on [0,1], peak 1: 10 log10(1 / MSE) over all pixels and channels",
    "ssim": "per frame, skimage.metrics.structural_similarity(channel_axis=-1, data_range = max - min of the "
            "ground-truth frame), 7x7 uniform window (the authors' protocol)",
    "ssim_standard": "per frame, the same function with data_range = 1 on [0,1]",
    "lpips": "per frame, lpips package v0.1, AlexNet backbone, inputs on [-1,1]",
    "temporal_psnr": "PSNR (peak 1) between x'[t] - x'[t-1] and x[t] - x[t-1] on [0,1], frames t >= 1",
    "boundary_psnr": "PSNR of the frames on either side of a cut between two temporal chunks (t = s-1 and t = s "
                     "for each chunk start s > 0); interior_psnr: all other frames",
    "temporal_psnr_at_cuts": "temporal PSNR of the steps that cross a cut (t = s); within_chunks: all other steps",
    "pooled": "mean over every frame of every video (the paper's averaging)",
    "per_video_mean": "mean over videos of each video's mean over its frames",
    "frames": "decoded with PyAV as 8-bit RGB (rgb24)",
}


# ---- scores ---------------------------------------------------------------------------------------


@dataclass
class FrameScore:
    video: str
    frame: int
    psnr: float
    ssim: float  # the authors' SSIM (data_range of the ground-truth frame)
    ssim_standard: float  # data_range = 1
    lpips: float | None = None
    temporal_psnr: float | None = None  # None for the first frame
    boundary: bool | None = None  # next to a chunk cut; None where the chunking is unknown
    after_cut: bool | None = None  # the step from t-1 to t crosses a cut


@dataclass
class Summary:
    """Averages of the per-frame scores; None where nothing was measured."""

    frames: int
    psnr: float | None
    ssim: float | None
    ssim_standard: float | None
    lpips: float | None
    temporal_psnr: float | None
    boundary_psnr: float | None
    interior_psnr: float | None
    temporal_psnr_at_cuts: float | None
    temporal_psnr_within_chunks: float | None

    @classmethod
    def pooled(cls, frames: list[FrameScore]) -> Summary:
        chunked = [f for f in frames if f.boundary is not None]
        return cls(
            frames=len(frames),
            psnr=_mean(f.psnr for f in frames),
            ssim=_mean(f.ssim for f in frames),
            ssim_standard=_mean(f.ssim_standard for f in frames),
            lpips=_mean(f.lpips for f in frames),
            temporal_psnr=_mean(f.temporal_psnr for f in frames),
            boundary_psnr=_mean(f.psnr for f in chunked if f.boundary),
            interior_psnr=_mean(f.psnr for f in chunked if not f.boundary),
            temporal_psnr_at_cuts=_mean(f.temporal_psnr for f in chunked if f.after_cut),
            temporal_psnr_within_chunks=_mean(f.temporal_psnr for f in chunked if not f.after_cut),
        )

    @classmethod
    def mean_of(cls, summaries: list[Summary]) -> Summary:
        """The mean, metric by metric, over the summaries that have a value for it."""
        values = {f.name: _mean(getattr(s, f.name) for s in summaries) for f in fields(cls) if f.name != "frames"}
        return cls(frames=sum(s.frames for s in summaries), **values)


METRIC_LABELS = {
    "psnr": "PSNR (dB)",
    "ssim": "SSIM (authors)",
    "ssim_standard": "SSIM (range 1)",
    "lpips": "LPIPS (AlexNet)",
    "temporal_psnr": "temporal PSNR (dB)",
    "boundary_psnr": "boundary PSNR (dB)",
    "interior_psnr": "interior PSNR (dB)",
    "temporal_psnr_at_cuts": "temporal PSNR at cuts (dB)",
    "temporal_psnr_within_chunks": "temporal PSNR within chunks (dB)",
}


def _mean(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None or NaN (an infinite PSNR stays infinite)."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(kept)) if kept else None


@dataclass
class WorstFrame:
    """A badly reconstructed frame kept for the heat-map figure (8-bit RGB)."""

    video: str
    frame: int
    psnr: float
    reference: np.ndarray
    reconstruction: np.ndarray


@dataclass
class VideoResult:
    name: str
    reference: str
    reconstruction: str
    frames: list[FrameScore]
    caption: str | None = None
    chunk_starts: list[int] | None = None
    notes: list[str] = field(default_factory=list)
    worst: list[WorstFrame] = field(default_factory=list)

    def summary(self) -> Summary:
        return Summary.pooled(self.frames)


ChunkStarts = Callable[[int], list[int]]  # number of frames -> frame indices where temporal chunks start


class VideoScorer:
    """Scores one video frame by frame as frames arrive, holding only the previous pair and the worst few."""

    def __init__(self, name: str, lpips: Lpips | None = None, chunk_starts: ChunkStarts | None = None,
                 keep_worst: int = 0, lpips_batch: int = 8):
        self.name = name
        self.lpips = lpips
        self.chunk_starts = chunk_starts
        self.keep_worst = keep_worst
        self.lpips_batch = lpips_batch
        self.scores: list[FrameScore] = []
        self._previous: tuple[np.ndarray, np.ndarray] | None = None
        self._pending: list[tuple[FrameScore, np.ndarray, np.ndarray]] = []
        self._worst: list[tuple[float, int, WorstFrame]] = []  # heap on -psnr: the best of the worst on top

    def add(self, reference: np.ndarray, reconstruction: np.ndarray) -> FrameScore:
        """Score the next frame: uint8 ground truth, uint8 or float [0, 1] reconstruction."""
        t = len(self.scores)
        if reference.shape != reconstruction.shape:
            raise ValueError(f"{self.name}: frame {t} of the reconstruction is {_size(reconstruction)}, "
                             f"the ground truth's {_size(reference)}")
        score = FrameScore(self.name, t, frame_psnr(reference, reconstruction), frame_ssim(reference, reconstruction),
                           frame_ssim_standard(reference, reconstruction))
        if self._previous is not None:
            score.temporal_psnr = temporal_psnr(self._previous[0], reference, self._previous[1], reconstruction)
        self._previous = (reference, reconstruction)
        self.scores.append(score)
        self._keep_if_worst(score, reference, reconstruction)
        if self.lpips is not None:
            self._pending.append((score, reference, reconstruction))
            if len(self._pending) >= self.lpips_batch:
                self._flush_lpips()
        return score

    def _keep_if_worst(self, score: FrameScore, reference: np.ndarray, reconstruction: np.ndarray) -> None:
        if self.keep_worst <= 0:
            return
        key = (-score.psnr, score.frame)
        if len(self._worst) == self.keep_worst and key <= (self._worst[0][0], self._worst[0][1]):
            return
        shown = reconstruction if reconstruction.dtype == np.uint8 else quantize(reconstruction)
        entry = (key[0], key[1], WorstFrame(self.name, score.frame, score.psnr, reference.copy(), shown.copy()))
        if len(self._worst) == self.keep_worst:
            heapq.heapreplace(self._worst, entry)
        else:
            heapq.heappush(self._worst, entry)

    def _flush_lpips(self) -> None:
        if not self._pending:
            return
        references = np.stack([p[1] for p in self._pending])
        reconstructions = np.stack([p[2] for p in self._pending])
        for (score, _, _), value in zip(self._pending, self.lpips(references, reconstructions), strict=True):
            score.lpips = float(value)
        self._pending = []

    def finish(self, reference: str, reconstruction: str, caption: str | None = None) -> VideoResult:
        self._flush_lpips()
        if not self.scores:
            raise ValueError(f"{self.name}: no frames to score")
        starts = None
        if self.chunk_starts is not None:
            starts = sorted(set(self.chunk_starts(len(self.scores))))
            cuts = {s for s in starts if 0 < s < len(self.scores)}
            for score in self.scores:
                score.boundary = score.frame in cuts or score.frame + 1 in cuts
                score.after_cut = score.frame in cuts
        worst = [entry[2] for entry in sorted(self._worst, key=lambda e: (-e[0], e[1]))]
        return VideoResult(self.name, reference, reconstruction, self.scores, caption, starts, worst=worst)


def _size(frame: np.ndarray) -> str:
    return f"{frame.shape[1]}x{frame.shape[0]}"


def fixed_chunks(chunk_frames: int) -> ChunkStarts:
    """Chunk starts of non-overlapping chunks of `chunk_frames` frames from frame 0."""
    return lambda count: list(range(0, count, chunk_frames))


# ---- settings and LPIPS policy --------------------------------------------------------------------


@dataclass
class EvalSettings:
    float_scoring: bool = False  # score in-memory reconstructions unrounded (clamped to [0, 1])
    max_frames: int | None = None  # score only the first frames of each video
    chunk_frames: int | None = None  # two folders: the chunk length the reconstructions were made with
    reencode_crf: int | None = None  # model: save and reload as H.264 at this CRF before scoring
    worst_frames: int = 4
    lpips_batch: int = 8

    def __post_init__(self) -> None:
        for name in ("max_frames", "chunk_frames", "lpips_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.worst_frames < 0:
            raise ValueError(f"worst_frames must be 0 or more, got {self.worst_frames}")
        if self.reencode_crf is not None and not 0 <= self.reencode_crf <= 51:
            raise ValueError(f"the H.264 CRF must be in 0-51, got {self.reencode_crf}")
        if self.reencode_crf is not None and self.float_scoring:
            raise ValueError("float scoring and re-encoding exclude each other: a saved video is 8-bit")


@dataclass
class LpipsOptions:
    enabled: bool = True
    weights: str | None = None  # the AlexNet weights file or its folder; default: torch hub's cache
    required: bool = False
    random_backbone: bool = False  # testing only


def prepare_lpips(options: LpipsOptions, device: str | torch.device = "cpu") -> tuple[Lpips | None, str]:
    """The LPIPS network, or None, and a sentence for the report saying which and why."""
    if not options.enabled:
        if options.required:
            raise ValueError("LPIPS cannot be both required and turned off")
        return None, "LPIPS not computed: turned off by the user"
    if options.random_backbone:
        return (load_lpips(random_backbone=True, device=device),
                "LPIPS computed with a RANDOM AlexNet backbone (testing only): these values are not LPIPS")
    try:
        network = load_lpips(options.weights, device=device)
    except LpipsUnavailable as error:
        if options.required:
            raise
        return None, f"LPIPS skipped: {error}"
    return network, f"LPIPS with the ImageNet AlexNet backbone from {network.backbone}"


# ---- the report -----------------------------------------------------------------------------------


@dataclass
class EvalReport:
    mode: str  # "folders" or "model"
    scoring: str  # how the reconstructions were scored: 8-bit files, quantised, float
    lpips: str  # whether LPIPS was computed, and how
    source: dict
    videos: list[VideoResult]
    notes: list[str] = field(default_factory=list)

    @property
    def pooled(self) -> Summary:
        return Summary.pooled([f for v in self.videos for f in v.frames])

    @property
    def per_video_mean(self) -> Summary:
        return Summary.mean_of([v.summary() for v in self.videos])

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "scoring": self.scoring,
            "lpips": self.lpips,
            "source": self.source,
            "protocol": PROTOCOL,
            "pooled": asdict(self.pooled),
            "per_video_mean": asdict(self.per_video_mean),
            "videos": [{"name": v.name, "reference": v.reference, "reconstruction": v.reconstruction,
                        "caption": v.caption, "frames": len(v.frames), "chunk_starts": v.chunk_starts,
                        "summary": asdict(v.summary()), "notes": v.notes} for v in self.videos],
            "notes": self.notes,
        }


# ---- two folders ----------------------------------------------------------------------------------


@dataclass
class Pair:
    name: str
    reference: Path
    reconstruction: Path


def pair_folders(reference_dir: str | os.PathLike,
                 reconstruction_dir: str | os.PathLike) -> tuple[list[Pair], list[str]]:
    """Match each ground-truth file to `<name>.*` or `<name>_reconstructed.*` among the reconstructions.

    Returns the pairs and notes (reconstructions that match no ground truth).
    """
    reference_dir, reconstruction_dir = _folder(reference_dir), _folder(reconstruction_dir)
    references = list_media(reference_dir)
    if not references:
        raise ValueError(f"no videos or images in {reference_dir}")
    stems: dict[str, Path] = {}
    for path in references:
        if path.stem in stems:
            raise ValueError(f"{reference_dir} holds two ground truths named {path.stem!r}: {stems[path.stem].name} "
                             f"and {path.name}")
        stems[path.stem] = path
    candidates: dict[str, list[Path]] = {}
    for path in list_media(reconstruction_dir):
        key = path.stem[: -len(RECONSTRUCTED_SUFFIX)] if path.stem.endswith(RECONSTRUCTED_SUFFIX) else path.stem
        candidates.setdefault(key, []).append(path)
    pairs, missing = [], []
    for stem, reference in stems.items():
        found = candidates.get(stem, [])
        if len(found) > 1:
            raise ValueError(f"{reconstruction_dir} holds several reconstructions of {stem!r}: "
                             f"{', '.join(p.name for p in found)}")
        if found:
            pairs.append(Pair(stem, reference, found[0]))
        else:
            missing.append(stem)
    if missing:
        raise ValueError(f"no reconstruction in {reconstruction_dir} for {len(missing)} of {len(stems)} ground truths "
                         f"({_some(missing)}); expected <name>.<ext> or <name>{RECONSTRUCTED_SUFFIX}.<ext>")
    unmatched = sorted(p.name for key, paths in candidates.items() if key not in stems for p in paths)
    notes = [f"{len(unmatched)} files in {reconstruction_dir} match no ground truth and were ignored: "
             f"{_some(unmatched)}"] if unmatched else []
    return pairs, notes


def _folder(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder" if path.exists() else f"{path}: no such folder")
    return path


def _some(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def score_pair(pair: Pair, settings: EvalSettings, lpips: Lpips | None) -> VideoResult:
    """Score two files frame by frame, decoding both in step."""
    chunks = fixed_chunks(settings.chunk_frames) if settings.chunk_frames else None
    scorer = VideoScorer(pair.name, lpips, chunks, settings.worst_frames, settings.lpips_batch)
    references, reconstructions = iter_frames(pair.reference), iter_frames(pair.reconstruction)
    try:
        for t, reference in enumerate(references):
            if settings.max_frames is not None and t >= settings.max_frames:
                break
            reconstruction = next(reconstructions, None)
            if reconstruction is None:
                raise ValueError(f"{pair.name}: the reconstruction {pair.reconstruction} has {t} frames, fewer than "
                                 f"the ground truth {pair.reference}; use --max-frames {t} to score the first {t}")
            scorer.add(reference, reconstruction)
        extra = 0 if settings.max_frames is not None else sum(1 for _ in reconstructions)
    finally:
        references.close()
        reconstructions.close()
    result = scorer.finish(str(pair.reference), str(pair.reconstruction))
    if extra:
        result.notes.append(f"the reconstruction has {extra} more frames than the ground truth; they were not scored")
    return result


def evaluate_folders(reference_dir: str | os.PathLike, reconstruction_dir: str | os.PathLike,
                     settings: EvalSettings | None = None, lpips: Lpips | None = None,
                     lpips_note: str = "LPIPS not computed") -> EvalReport:
    """Score every reconstruction in one folder against its ground truth in another.

    Under `torchrun` the videos are split across the ranks and every rank returns the full report.
    """
    settings = settings or EvalSettings()
    pairs, notes = pair_folders(reference_dir, reconstruction_dir)
    videos = run_shared(pairs, lambda pair: score_pair(pair, settings, lpips))
    scoring = "8-bit: both videos decoded from their files with PyAV as RGB24"
    source = {"ground_truth": str(reference_dir), "reconstructions": str(reconstruction_dir),
              "chunk_frames": settings.chunk_frames, "max_frames": settings.max_frames,
              "ranks": distributed_world()[1]}
    if settings.chunk_frames is None:
        notes.append("boundary metrics not computed: the chunk length is unknown (give --chunk-frames)")
    return EvalReport("folders", scoring, lpips_note, source, videos, notes)


# ---- a model on a dataset -------------------------------------------------------------------------


@dataclass
class Clip:
    name: str
    path: Path
    caption: str | None = None


def read_dataset(source: str | os.PathLike) -> list[Clip]:
    """Clips from a folder, a media file, a CSV (columns `path` or `video`, optional `caption`) or a
    text list (one path a line, optionally a tab and a caption). Relative paths are taken from the
    list's folder."""
    source = Path(source)
    if source.is_dir():
        clips = [Clip(p.stem, p) for p in list_media(source)]
    elif not source.is_file():
        raise ValueError(f"{source}: no such dataset (a folder, a video, a .csv or a list of paths)")
    elif source.suffix.lower() == ".csv":
        clips = _read_csv(source)
    elif source.suffix.lower() in (".txt", ".list", ".lst"):
        clips = _read_list(source)
    else:
        probe(source)  # a single media file: fails clearly if it is not one
        clips = [Clip(source.stem, source)]
    if not clips:
        raise ValueError(f"{source} lists no videos")
    for clip in clips:
        if not clip.path.is_file():
            raise ValueError(f"{source} lists {clip.path}, which does not exist")
    return _unique_names(clips)


def _read_csv(path: Path) -> list[Clip]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = {c.strip().lower(): c for c in reader.fieldnames or []}
        path_column = columns.get("path") or columns.get("video")
        if path_column is None:
            raise ValueError(f"{path}: a dataset CSV needs a 'path' (or 'video') column; it has "
                             f"{', '.join(reader.fieldnames or []) or 'no header'}")
        caption_column = columns.get("caption")
        clips = []
        for row in reader:
            file = (row.get(path_column) or "").strip()
            if file:
                caption = (row.get(caption_column) or "").strip() if caption_column else None
                clips.append(Clip(Path(file).stem, _relative_to(path, file), caption or None))
    return clips


def _read_list(path: Path) -> list[Clip]:
    clips = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        file, _, caption = line.partition("\t")
        clips.append(Clip(Path(file.strip()).stem, _relative_to(path, file.strip()), caption.strip() or None))
    return clips


def _relative_to(listing: Path, file: str) -> Path:
    path = Path(file).expanduser()
    return path if path.is_absolute() else listing.parent / path


def _unique_names(clips: list[Clip]) -> list[Clip]:
    seen: dict[str, int] = {}
    for clip in clips:
        count = seen.get(clip.name, 0)
        seen[clip.name] = count + 1
        if count:
            clip.name = f"{clip.name}_{count + 1}"
    return clips


@dataclass
class Reconstructor:
    """How a model reconstructs a clip: uint8 (T, H, W, 3) and a caption -> float (T, H, W, 3) in [0, 1]."""

    reconstruct: Callable[[np.ndarray, str | None], np.ndarray]
    chunk_starts: ChunkStarts | None
    description: str
    uses_captions: bool = False


def pipeline_reconstructor(model, text_encoder=None, settings=None) -> Reconstructor:
    """Our model run through `cmvae.pipeline.VideoPipeline` (padding, chunking and tiling as it does)."""
    try:
        from .pipeline import PipelineSettings, VideoPipeline
    except ImportError as error:
        raise ValueError(f"evaluating a model needs cmvae.pipeline, which cannot be imported here ({error})") from None
    settings = settings or PipelineSettings()
    pipe = VideoPipeline(model, settings=settings, text_encoder=text_encoder, progress=False)
    has_text = bool(model.cfg.has_text)
    return Reconstructor(lambda frames, caption: pipe.reconstruct_array(frames, caption if has_text else None),
                         pipe.chunk_boundaries, f"cmvae.pipeline.VideoPipeline, {settings!r}", has_text)


def _reencode(frames: np.ndarray, crf: int, fps) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="cmvae-eval-") as folder:
        path = write_video(Path(folder) / "reconstruction.mp4", frames, fps=fps, settings=EncodeSettings(crf=crf))
        return read_video(path)


def score_clip(clip: Clip, reconstructor: Reconstructor, settings: EvalSettings, lpips: Lpips | None) -> VideoResult:
    """Reconstruct one clip in memory and score it."""
    frames = read_video(clip.path, max_frames=settings.max_frames)
    caption = clip.caption if reconstructor.uses_captions else None
    output = np.asarray(reconstructor.reconstruct(frames, caption))
    if output.shape != frames.shape:
        raise ValueError(f"{clip.name}: the model returned frames of shape {output.shape} for input {frames.shape}")
    if settings.reencode_crf is not None:
        output = _reencode(quantize(output), settings.reencode_crf, probe(clip.path).fps)
    elif settings.float_scoring:
        output = np.clip(output, 0.0, 1.0)
    else:
        output = quantize(output)
    scorer = VideoScorer(clip.name, lpips, reconstructor.chunk_starts, settings.worst_frames, settings.lpips_batch)
    for reference, reconstruction in zip(frames, output, strict=True):
        scorer.add(reference, reconstruction)
    result = scorer.finish(str(clip.path), "in memory", clip.caption)
    if clip.caption and not reconstructor.uses_captions:
        result.notes.append("caption ignored: the model has no text conditioning")
    return result


def scoring_description(settings: EvalSettings) -> str:
    if settings.reencode_crf is not None:
        return f"8-bit: reconstructions saved as H.264 (libx264, CRF {settings.reencode_crf}) and decoded again"
    if settings.float_scoring:
        return "float: in-memory reconstructions clamped to [0,1], not rounded (no file could hold them)"
    return "8-bit: in-memory reconstructions clamped to [0,1] and rounded to 8 bits, as a saved file holds them"


def evaluate_model(clips: list[Clip], reconstructor: Reconstructor, settings: EvalSettings | None = None,
                   lpips: Lpips | None = None, lpips_note: str = "LPIPS not computed",
                   source: dict | None = None) -> EvalReport:
    """Reconstruct every clip with the model and score it; under `torchrun` the clips are split across ranks."""
    settings = settings or EvalSettings()
    videos = run_shared(clips, lambda clip: score_clip(clip, reconstructor, settings, lpips))
    source = dict(source or {}, reconstruction=reconstructor.description, max_frames=settings.max_frames,
                  ranks=distributed_world()[1])
    notes = [] if reconstructor.chunk_starts else ["boundary metrics not computed: the model's chunking is unknown"]
    return EvalReport("model", scoring_description(settings), lpips_note, source, videos, notes)


# ---- torchrun -------------------------------------------------------------------------------------


def distributed_world() -> tuple[int, int]:
    """(rank, world size); joins the process group (gloo) when started by torchrun with several ranks."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size()


def run_shared(items: list, work: Callable) -> list:
    """`work` on every item, the items dealt round-robin across the ranks; the results, in order, on every rank.

    An error on any rank is raised on every rank, so that none waits forever for the others.
    """
    rank, world = distributed_world()
    if world == 1:
        return [work(item) for item in items]
    import torch.distributed as dist

    mine, error = [], None
    try:
        for index in range(rank, len(items), world):
            mine.append((index, work(items[index])))
    except Exception as failure:  # reported on every rank below
        error = f"rank {rank}: {failure}"
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (mine, error))
    errors = [e for _, e in gathered if e]
    if errors:
        raise ValueError("; ".join(errors))
    return [result for _, result in sorted((pair for part, _ in gathered for pair in part), key=lambda p: p[0])]


def is_main_rank() -> bool:
    return distributed_world()[0] == 0


# ---- writing the reports --------------------------------------------------------------------------


def _summary_cells(summary: Summary, metrics: list[str]) -> list[str]:
    return [str(summary.frames)] + [format_value(getattr(summary, m), m) for m in metrics]


def _shown_metrics(report: EvalReport) -> list[str]:
    pooled = report.pooled
    return [m for m in METRIC_LABELS if getattr(pooled, m) is not None]


def markdown_report(report: EvalReport) -> str:
    metrics = _shown_metrics(report)
    header = ["frames"] + [METRIC_LABELS[m] for m in metrics]
    averages = markdown_table(["averaging"] + header, [
        ["pooled over all frames (paper)"] + _summary_cells(report.pooled, metrics),
        ["mean of per-video means"] + _summary_cells(report.per_video_mean, metrics)])
    videos = markdown_table(["video"] + header, [[v.name] + _summary_cells(v.summary(), metrics)
                                                 for v in report.videos])
    parts = [
        "# Reconstruction metrics", "",
        f"- Scoring: {report.scoring}", f"- {report.lpips}",
        *[f"- {key}: {value}" for key, value in report.source.items() if value is not None], "",
        "## Averages", "", averages, "", "## Per video", "", videos, "",
        "## Protocol", "", *[f"- {key}: {text}" for key, text in PROTOCOL.items()],
    ]
    notes = report.notes + [f"{v.name}: {note}" for v in report.videos for note in v.notes]
    if notes:
        parts += ["", "## Notes", "", *[f"- {note}" for note in notes]]
    return "\n".join(parts) + "\n"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "video"


def psnr_plot(video: VideoResult):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.5))
    axes = figure.subplots()
    frames = [s.frame for s in video.frames]
    axes.plot(frames, _finite([s.psnr for s in video.frames]), marker=".", label="PSNR")
    steps = [s for s in video.frames if s.temporal_psnr is not None]
    if steps:
        axes.plot([s.frame for s in steps], _finite([s.temporal_psnr for s in steps]), linestyle="--",
                  label="temporal PSNR")
    for start in video.chunk_starts or []:
        if start > 0:
            axes.axvline(start - 0.5, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlabel("frame" + (" (dotted: chunk cuts)" if video.chunk_starts else ""))
    axes.set_ylabel("dB")
    axes.set_title(f"{video.name}: PSNR per frame")
    axes.legend(loc="lower left")
    axes.grid(alpha=0.3)
    return figure


def _finite(values: list[float]) -> list[float]:
    """Infinite PSNRs (identical frames) cannot be drawn; they are left as gaps."""
    return [v if math.isfinite(v) else float("nan") for v in values]


def worst_frames_figure(worst: list[WorstFrame]):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 3.6 * len(worst)))
    grid = figure.subplots(len(worst), 3, squeeze=False)
    for row, frame in zip(grid, worst, strict=True):
        error = np.abs(frame.reference.astype(np.int16) - frame.reconstruction.astype(np.int16)).mean(axis=-1)
        row[0].imshow(frame.reference)
        row[0].set_title(f"{frame.video} frame {frame.frame}: ground truth")
        row[1].imshow(frame.reconstruction)
        row[1].set_title(f"reconstruction, PSNR {frame.psnr:.2f} dB")
        image = row[2].imshow(error, cmap="inferno", vmin=0)
        row[2].set_title("|error|, mean over RGB (0-255)")
        figure.colorbar(image, ax=row[2], fraction=0.046, pad=0.04)
        for axes in row:
            axes.set_axis_off()
    return figure


def worst_of(videos: list[VideoResult], count: int) -> list[WorstFrame]:
    candidates = [w for v in videos for w in v.worst]
    return sorted(candidates, key=lambda w: (w.psnr, w.video, w.frame))[:count]


def frame_rows(videos: list[VideoResult]) -> list[dict]:
    return [asdict(s) for v in videos for s in v.frames]


def summary_row(label: str, key: str, summary: Summary) -> dict:
    return {label: key, **asdict(summary)}


def write_reports(report: EvalReport, folder: str | os.PathLike, plots: bool = True,
                  worst_frames: int = 4) -> list[Path]:
    """report.json, per_frame.csv, per_video.csv, pooled.csv, report.md, plots/psnr_*.png, worst_frames.png."""
    folder = Path(folder)
    pooled, per_video = report.pooled, report.per_video_mean
    written = [
        atomic_write(folder / "report.json", json.dumps(json_ready(report.to_dict()), indent=2) + "\n"),
        atomic_write(folder / "per_frame.csv", csv_text(frame_rows(report.videos))),
        atomic_write(folder / "per_video.csv", csv_text([summary_row("video", v.name, v.summary())
                                                         for v in report.videos])),
        atomic_write(folder / "pooled.csv", csv_text([summary_row("averaging", "pooled", pooled),
                                                      summary_row("averaging", "per_video_mean", per_video)])),
        atomic_write(folder / "report.md", markdown_report(report)),
    ]
    if plots:
        names: set[str] = set()
        for video in report.videos:
            name = _unique(_safe_name(video.name), names)
            written.append(save_figure(psnr_plot(video), folder / "plots" / f"psnr_{name}.png"))
        worst = worst_of(report.videos, worst_frames)
        if worst:
            written.append(save_figure(worst_frames_figure(worst), folder / "worst_frames.png"))
    return written


def _unique(name: str, taken: set[str]) -> str:
    candidate, count = name, 1
    while candidate in taken:
        count += 1
        candidate = f"{name}_{count}"
    taken.add(candidate)
    return candidate

