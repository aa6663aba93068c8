"""Metrics against hand-worked values and direct scikit-image / NumPy / lpips computations."""

from __future__ import annotations

import math

import av
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cmvae.metrics import (ALEXNET_FILE, LpipsUnavailable, frame_psnr, frame_ssim, frame_ssim_standard, load_lpips,
                           psnr, quantize, temporal_psnr)

from media import encode_file, sample_clip


def decode_rgb(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def real_pair(tmp_path_factory):
    """Real frames (bikes) and an H.264 copy at CRF 32, both decoded by PyAV."""
    folder = tmp_path_factory.mktemp("pair")
    exact = sample_clip("bikes", 4, folder / "bikes.mp4", crop=(96, 128))
    truth = decode_rgb(exact)
    lossy = encode_file(folder / "lossy.mp4", truth, codec="libx264", pix_fmt="yuv420p", options={"crf": "32"})
    return truth, decode_rgb(lossy)


# ---- PSNR -----------------------------------------------------------------------------------------


def test_psnr_of_a_constant_offset_is_worked_out_by_hand():
    truth = np.full((16, 16, 3), 100, np.uint8)
    # MSE = (10/255)^2, so PSNR = 20 log10(25.5) = 28.1308 dB
    assert frame_psnr(truth, truth + np.uint8(10)) == pytest.approx(28.1308, abs=1e-4)
    assert frame_psnr(truth, truth) == math.inf


def test_psnr_of_plus_minus_noise_is_worked_out_by_hand():
    rng = np.random.default_rng(1)
    truth = rng.integers(10, 240, size=(64, 64, 3)).astype(np.uint8)
    noisy = (truth.astype(int) + 3 * rng.choice([-1, 1], size=truth.shape)).astype(np.uint8)
    # every value is off by exactly 3: MSE = (3/255)^2, PSNR = 20 log10(85) = 38.5884 dB
    assert frame_psnr(truth, noisy) == pytest.approx(38.5884, abs=1e-4)


def test_psnr_of_gaussian_noise_is_close_to_the_noise_power():
    rng = np.random.default_rng(2)
    truth = rng.uniform(0.3, 0.7, size=(256, 256, 3))
    noisy = truth + rng.normal(0, 0.05, size=truth.shape)  # float frames are scored as given, not clamped
    assert frame_psnr(truth, noisy) == pytest.approx(26.0206, abs=0.05)  # -10 log10(0.05^2)


def test_psnr_matches_scikit_image_on_real_frames(real_pair):
    truth, lossy = real_pair
    for t in range(len(truth)):
        expected = peak_signal_noise_ratio(truth[t], lossy[t], data_range=255)
        assert frame_psnr(truth[t], lossy[t]) == pytest.approx(expected, abs=1e-9)
    assert 25 < frame_psnr(truth[0], lossy[0]) < 45


def test_float_and_8bit_inputs_agree():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 256, size=(2, 20, 20, 3)).astype(np.uint8)
    assert frame_psnr(a, b) == pytest.approx(frame_psnr(a / 255.0, b / 255.0), abs=1e-12)


def test_tensor_psnr_of_the_demo():
    # [-1, 1] -> [0, 1]: an offset of 0.1 becomes 0.05; PSNR = -20 log10(0.05) = 26.0206 dB
    assert psnr(torch.zeros(1, 3, 4, 8, 8), torch.full((1, 3, 4, 8, 8), 0.1)) == pytest.approx(26.0206, abs=1e-4)
    # the reconstruction is clamped to 1 first: 0.5 against 1.0 on [0, 1] -> -20 log10(0.5) = 6.0206 dB
    assert psnr(torch.zeros(2, 2), torch.full((2, 2), 3.0)) == pytest.approx(6.0206, abs=1e-4)


def test_mismatched_frames_are_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        frame_psnr(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 7x7"):
        frame_ssim(np.zeros((6, 6, 3), np.uint8), np.zeros((6, 6, 3), np.uint8))


# ---- SSIM -----------------------------------------------------------------------------------------


def test_ssim_matches_scikit_image_with_the_authors_data_range(real_pair):
    truth, lossy = real_pair
    for t in range(len(truth)):
        frame = truth[t]
        data_range = int(frame.max()) - int(frame.min())  # on 0-255: scale invariance makes it the same
        expected = structural_similarity(frame, lossy[t], channel_axis=-1, data_range=data_range)
        assert frame_ssim(frame, lossy[t]) == pytest.approx(expected, abs=1e-7)
        standard = structural_similarity(frame, lossy[t], channel_axis=-1, data_range=255)
        assert frame_ssim_standard(frame, lossy[t]) == pytest.approx(standard, abs=1e-7)


def test_standard_ssim_of_two_constant_frames_is_worked_out_by_hand():
    # no variance: SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1), C1 = (0.01 * 1)^2
    a, b = np.full((16, 16, 3), 0.4), np.full((16, 16, 3), 0.5)
    assert frame_ssim_standard(a, b) == pytest.approx((0.4 + 1e-4) / (0.41 + 1e-4), abs=1e-9)
    assert frame_ssim_standard(a, a) == pytest.approx(1.0)


def test_authors_ssim_differs_from_standard_only_through_the_range():
    rng = np.random.default_rng(4)
    full = rng.integers(0, 256, size=(32, 32, 3)).astype(np.uint8)
    full[0, 0] = 0
    full[0, 1] = 255  # range 255: both SSIMs are one and the same
    noisy = np.clip(full.astype(int) + rng.integers(-20, 21, size=full.shape), 0, 255).astype(np.uint8)
    assert frame_ssim(full, noisy) == pytest.approx(frame_ssim_standard(full, noisy), abs=1e-12)
    dim = (full // 8 + 100).astype(np.uint8)  # range 31: smaller constants, so the same noise costs more
    dim_noisy = np.clip(dim.astype(int) + rng.integers(-3, 4, size=dim.shape), 0, 255).astype(np.uint8)
    assert frame_ssim(dim, dim_noisy) < frame_ssim_standard(dim, dim_noisy) - 0.003


# ---- temporal consistency and quantisation --------------------------------------------------------


def test_temporal_psnr_is_worked_out_by_hand():
    rng = np.random.default_rng(5)
    x0, x1 = rng.integers(50, 200, size=(2, 16, 16, 3)).astype(np.uint8)
    # the same error on both frames cancels in the difference
    assert temporal_psnr(x0, x1, x0 + np.uint8(7), x1 + np.uint8(7)) == math.inf
    # an offset of 10 on the second frame only: the step is off by 10/255 -> 28.1308 dB
    assert temporal_psnr(x0, x1, x0, x1 + np.uint8(10)) == pytest.approx(28.1308, abs=1e-4)


def test_quantize_clamps_and_rounds_to_the_nearest_level():
    values = np.array([-0.1, 0.0, 0.25, 0.5, 0.75, 0.99, 1.2, 2.0**-9, 3 * 2.0**-9])
    # x 255: 63.75, 127.5 (a tie: to even), 191.25, 252.45, 0.498..., 1.494...
    expected = [0, 0, 64, 128, 191, 252, 255, 0, 1]
    assert quantize(values).tolist() == expected and quantize(values).dtype == np.uint8
    assert quantize(values.astype(np.float32)).tolist() == expected
    with pytest.raises(ValueError, match="floating"):
        quantize(np.zeros(3, np.uint8))


# ---- LPIPS ----------------------------------------------------------------------------------------


def test_lpips_without_weights_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(LpipsUnavailable, match=ALEXNET_FILE):
        load_lpips()
    with pytest.raises(LpipsUnavailable, match="not found"):
        load_lpips(tmp_path / "nothing.pth")
    junk = tmp_path / "junk.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, junk)
    with pytest.raises(LpipsUnavailable, match="AlexNet"):
        load_lpips(junk)


def test_random_backbone_lpips_runs_on_real_frames(real_pair):
    truth, lossy = real_pair
    metric = load_lpips(random_backbone=True)
    assert not metric.comparable
    same = metric(truth, truth)
    different = metric(truth, lossy)
    assert same.shape == (len(truth),) and np.allclose(same, 0, atol=1e-7)
    assert (different > 0).all()


def test_alexnet_weights_from_the_hub_cache_match_the_lpips_package(tmp_path, monkeypatch, real_pair):
    """Our loader fills the backbone from the cached file exactly as the lpips package itself would
    (torchvision reads the cached file and downloads nothing when it exists)."""
    import lpips
    import torchvision

    torch.manual_seed(7)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), cache / ALEXNET_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ours = load_lpips()
    assert ours.backbone == str(cache / ALEXNET_FILE) and ours.comparable
    reference = lpips.LPIPS(net="alex", verbose=False).eval()
    truth, lossy = real_pair
    with torch.no_grad():
        a = torch.from_numpy(truth).permute(0, 3, 1, 2).float() / 127.5 - 1
        b = torch.from_numpy(lossy).permute(0, 3, 1, 2).float() / 127.5 - 1
        expected = reference(a, b).flatten().numpy()
    assert np.allclose(ours(truth, lossy), expected, rtol=1e-5, atol=1e-7)
    random = load_lpips(random_backbone=True)(truth, lossy)
    assert not np.allclose(random, expected, rtol=1e-3)
