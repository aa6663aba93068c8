"""Wall time and peak memory (resident set) of reconstructing videos with the pipeline.

Each case runs in a fresh process, so its peak RSS is its own: a generated clip is written to a
file, then `VideoPipeline.reconstruct` streams it from file to file (decode, encode, decode,
H.264 encode). The model is the released `16z` architecture with random weights unless --model
says otherwise. Results go to a JSON file and a Markdown table.

    python benchmarks/inference_memory.py --out docs/benchmarks/inference.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    # name: (frames, height, width, dtype, extra pipeline settings)
    "16x256x256-float32": (16, 256, 256, "float32", {}),
    "16x480x864-float32": (16, 480, 864, "float32", {}),
    "16x128x128-float32": (16, 128, 128, "float32", {}),
    "160x128x128-float32": (160, 128, 128, "float32", {}),
    "4x64x64-float32": (4, 64, 64, "float32", {}),
    "4x64x64-bfloat16": (4, 64, 64, "bfloat16", {}),
}


def run_case(name: str, model: str, tile: int, tile_overlap: int, tile_norm: str) -> dict:
    import numpy as np
    import torch

    from cmvae.checkpoints import resolve_model
    from cmvae.pipeline import PipelineSettings, VideoPipeline
    from cmvae.video_io import EncodeSettings, write_video

    frames, height, width, dtype, extra = CASES[name]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height // 8 + frames, width // 8 + 2, 3), dtype=np.uint8)
    big = np.kron(base, np.ones((8, 8, 1), np.uint8))
    clip = np.stack([big[t: t + height, :width] for t in range(frames)])
    with tempfile.TemporaryDirectory() as folder:
        source = write_video(Path(folder) / "in.mp4", clip, settings=EncodeSettings(crf=10))
        del clip, big
        model_obj = resolve_model(model)
        settings = PipelineSettings(tile=tile, tile_overlap=tile_overlap, tile_norm=tile_norm, dtype=dtype,
                                    device="cpu", **extra)
        pipe = VideoPipeline(model_obj, settings)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        start = time.perf_counter()
        pipe.reconstruct(source, Path(folder) / "out.mp4")
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    params = sum(p.numel() for p in model_obj.parameters())
    return {"case": name, "frames": frames, "height": height, "width": width, "dtype": dtype, "model": model,
            "parameters": params, "tile": tile, "tile_overlap": tile_overlap, "tile_norm": tile_norm,
            "seconds": round(seconds, 1), "seconds_per_frame": round(seconds / frames, 2),
            "peak_rss_gib": round(peak, 2), "rss_before_run_gib": round(before, 2)}


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}, threads {torch.get_num_threads()}"


def main() -> None:
    from cmvae.tiling import NORM_MODES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--model", default="16z", help="preset (random weights) or model folder")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--tile-overlap", type=int, default=64)
    parser.add_argument("--tile-norm", default="exact", choices=NORM_MODES)
    parser.add_argument("--out", default="docs/benchmarks/inference.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, args.model, args.tile, args.tile_overlap, args.tile_norm)))
        return
    results = []
    for name in args.cases:
        command = [sys.executable, __file__, "--one", name, "--model", args.model, "--tile", str(args.tile),
                   "--tile-overlap", str(args.tile_overlap), "--tile-norm", args.tile_norm]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result), flush=True)
        # after every case, so that a long series stopped part-way keeps what it measured
        report = {"machine": machine(), "command": " ".join(sys.argv), "results": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
