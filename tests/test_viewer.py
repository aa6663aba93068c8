"""The viewer page: made by `cmvae view`, self-contained, and played in a real browser (headless Chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from fractions import Fraction

import numpy as np
import pytest

from cli_run import assert_one_error_line, run
from media import encode_file

FRAMES, HEIGHT, WIDTH, FPS = 16, 64, 128, 10
BITS = 5  # frame numbers below 32


def numbered_frames(frames: int = FRAMES, shade: int = 0) -> np.ndarray:
    """Each frame shows its own number: BITS blocks of 24x32 pixels across the top, white for a 1 bit, black
    for a 0 (big enough to survive H.264); below them a grey ramp, `shade` added (a "reconstruction")."""
    out = np.zeros((frames, HEIGHT, WIDTH, 3), dtype=np.uint8)
    ramp = np.linspace(60, 180, WIDTH).astype(np.int32)
    for k in range(frames):
        out[k, 32:] = np.clip(ramp[None, :, None] + shade, 0, 255)
        for bit in range(BITS):
            out[k, :32, bit * 24: bit * 24 + 24] = 255 if k >> bit & 1 else 0
    return out


@pytest.fixture
def page(tmp_path, capsys):
    original = encode_file(tmp_path / "original.mp4", numbered_frames(), fps=Fraction(FPS))
    reconstruction = encode_file(tmp_path / "original_reconstructed.mp4", numbered_frames(shade=12), fps=Fraction(FPS))
    target = tmp_path / "report.html"
    code, out, err = run(capsys, "view", original, reconstruction, "-o", target)
    assert code == 0, err
    return target


def _page_data(page) -> dict:
    text = page.read_text()
    return json.loads(re.search(r'<script id="viewer-data" type="application/json">(.*?)</script>', text).group(1))


def test_the_page_holds_everything_it_shows(page):
    text = page.read_text()
    assert text.count('src="data:video/mp4;base64,') == 3  # original, reconstruction, difference
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing to fetch
    data = _page_data(page)
    assert data["frames"] == FRAMES and data["fps"] == FPS
    (model,) = data["models"]
    assert model["name"] == "original_reconstructed"
    # the bottom half differs by 12 levels: PSNR of a uniform 12/255 error over half of the frame
    expected = 10 * np.log10(1 / ((12 / 255) ** 2 / 2))
    assert np.allclose(model["psnr"], expected, atol=1e-9)  # both files are lossless
    assert all(0 < s < 1 for s in model["ssim"]) and len(model["worst"]) == 5


def test_view_refuses_mismatched_clips(tmp_path, capsys):
    original = encode_file(tmp_path / "a.mp4", numbered_frames())
    shorter = encode_file(tmp_path / "b.mp4", numbered_frames(8))
    code, _, err = run(capsys, "view", original, shorter, "-o", tmp_path / "r.html")
    assert code == 1 and "8 frames" in assert_one_error_line(err, "view")
    assert not (tmp_path / "r.html").exists()
    code, _, err = run(capsys, "view", original, shorter, "-o", original)
    assert code == 1 and "is the input" in assert_one_error_line(err, "view")


# ---- in a browser ---------------------------------------------------------------------------------------

_READ_FRAME = """
const video = arguments[0], bits = arguments[1];
const canvas = document.createElement("canvas");
canvas.width = video.videoWidth; canvas.height = video.videoHeight;
const context = canvas.getContext("2d");
context.drawImage(video, 0, 0);
let number = 0;
for (let bit = 0; bit < bits; bit++) {
  const x = Math.round((bit * 24 + 12) * video.videoWidth / 128), y = Math.round(16 * video.videoHeight / 64);
  const pixel = context.getImageData(x, y, 1, 1).data;
  if ((pixel[0] + pixel[1] + pixel[2]) / 3 > 128) number |= 1 << bit;
}
return number;
"""


def _browser():
    """Headless Chromium through selenium, or a skip (a failure under CI) saying what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing = "selenium is not installed (pip install -e '.[test]')"
    else:
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        driver = shutil.which("chromedriver")
        missing = None if browser and driver else "chromium and chromedriver are not installed (apt-get install " \
                                                  "chromium chromium-driver)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing + "; CI is set, so this is an error")
        pytest.skip(missing)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
                 "--window-size=1400,1200"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))


def _wait(driver, script: str, *args, timeout: float = 20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {script}")


_SETTLED = "return window.cmvaeViewer.videos.every(v => !v.seeking && v.readyState >= 2);"


def _shown(driver) -> list[int]:
    _wait(driver, _SETTLED)
    videos = driver.execute_script("return window.cmvaeViewer.videos.filter(v => !v.classList.contains('difference'));")
    return [driver.execute_script(_READ_FRAME, video, BITS) for video in videos]


def test_the_page_plays_and_seeks_frame_accurately_in_chromium(page, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver = _browser()
    try:
        driver.get(page.as_uri())
        _wait(driver, "return window.cmvaeViewer && window.cmvaeViewer.videos.every(v => v.readyState >= 2);")
        assert driver.execute_script("return window.cmvaeViewer.videos.length;") == 3
        assert _shown(driver) == [0, 0]

        driver.find_element(By.ID, "play").click()
        _wait(driver, "return window.cmvaeViewer.videos.every(v => !v.paused && v.currentTime > 0.3);")
        driver.find_element(By.ID, "play").click()  # pause
        _wait(driver, "return window.cmvaeViewer.videos.every(v => v.paused);")

        for k in (7, 1, 14):  # the slider
            driver.execute_script("const s = document.getElementById('slider'); s.value = arguments[0];"
                                  "s.dispatchEvent(new Event('input'));", k)
            assert _shown(driver) == [k, k], f"slider at {k}"

        chart = driver.find_element(By.ID, "psnr-chart")  # a click on the curve, at frame 10's x position
        width = chart.size["width"]
        x = 30 + 10 / (FRAMES - 1) * (width - 40)
        ActionChains(driver).move_to_element_with_offset(chart, int(round(x - width / 2)), 0).click().perform()
        assert driver.find_element(By.ID, "slider").get_attribute("value") == "10"
        assert _shown(driver) == [10, 10]
        assert driver.save_screenshot(str(tmp_path / "viewer.png"))
        assert (tmp_path / "viewer.png").stat().st_size > 10_000
    finally:
        driver.quit()


# ---- the pages other commands write ---------------------------------------------------------------------


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2) / 255.0**2
    return float(10 * np.log10(1 / mse))


def test_reconstruct_writes_a_page_beside_its_output(tmp_path, capsys):
    from cmvae.video_io import read_video

    clip = encode_file(tmp_path / "clip.mp4", numbered_frames(8)[:, :, :64])
    out = tmp_path / "clip_reconstructed.mp4"
    code, stdout, err = run(capsys, "reconstruct", clip, "-o", out, "--model", "tiny", "--dtype", "float32",
                            "--report-html")
    assert code == 0, err
    page = tmp_path / "clip_reconstructed.html"
    assert f"wrote {page}" in stdout
    (model,) = _page_data(page)["models"]
    expected = [_psnr(a, b) for a, b in zip(read_video(clip), read_video(out))]
    assert np.allclose(model["psnr"], expected, atol=1e-9)


def test_eval_and_compare_write_a_page_per_clip(tmp_path, capsys):
    truth, recon = tmp_path / "truth", tmp_path / "recon"
    truth.mkdir(), recon.mkdir()
    encode_file(truth / "a.mp4", numbered_frames(8))
    encode_file(recon / "a.mp4", numbered_frames(8, shade=6))
    code, _, err = run(capsys, "eval", truth, recon, "-o", tmp_path / "eval", "--no-lpips", "--no-plots",
                       "--report-html")
    assert code == 0, err
    assert [m["name"] for m in _page_data(tmp_path / "eval" / "view_a.html")["models"]] == ["a"]
    code, _, err = run(capsys, "eval", truth, "--model", "tiny", "--chunk-frames", "8", "-o", tmp_path / "eval_model",
                       "--no-lpips", "--no-plots", "--report-html")
    assert code == 0, err
    assert [m["name"] for m in _page_data(tmp_path / "eval_model" / "view_a.html")["models"]] == ["tiny"]

    code, _, err = run(capsys, "compare", truth, "--model", "one=tiny", "--model", "two=tiny", "--chunk-frames", "8",
                       "--warmup", "0", "--no-lpips", "-o", tmp_path / "compare", "--report-html")
    assert code == 0, err
    page = tmp_path / "compare" / "view_a.html"
    assert [m["name"] for m in _page_data(page)["models"]] == ["one", "two"]
    assert page.read_text().count('src="data:video/mp4;base64,') == 5  # the original, and each model with its difference
