"""Screenshot of a `cmvae view` page in headless Chromium, shown at a chosen frame (default: the worst).

    .venv/bin/python scripts/viewer_screenshot.py report.html docs/viewer.png [--frame K] [--width 1000]

Needs selenium, chromium and chromedriver (as the browser test does). The PNG is scaled to --width
pixels and stored with a palette, to keep it small.
"""

from __future__ import annotations

import argparse
import io
import shutil
import time
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def _wait(driver, script: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not driver.execute_script(script):
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for: {script}")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page")
    parser.add_argument("png")
    parser.add_argument("--frame", type=int, help="frame to show (default: the first model's worst)")
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--window", default="1400,1250", help="browser window size W,H")
    args = parser.parse_args()

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={args.window}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(Path(args.page).resolve().as_uri())
        _wait(driver, "return window.cmvaeViewer && window.cmvaeViewer.videos.every(v => v.readyState >= 2);")
        frame = args.frame
        if frame is None:
            frame = driver.execute_script("return window.cmvaeViewer.data.models[0].worst[0];")
        driver.execute_script("window.cmvaeViewer.seek(arguments[0]);", frame)
        _wait(driver, "return window.cmvaeViewer.videos.every(v => !v.seeking && v.readyState >= 2);")
        time.sleep(0.3)
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    finally:
        driver.quit()
    height = round(shot.height * args.width / shot.width)
    small = shot.resize((args.width, height), Image.LANCZOS).quantize(colors=128)
    small.save(args.png, optimize=True)
    print(f"wrote {args.png} ({Path(args.png).stat().st_size // 1024} KB), frame {frame}")


if __name__ == "__main__":
    main()
