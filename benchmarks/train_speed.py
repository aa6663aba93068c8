"""Throughput of `cmvae train` itself (data, step, optimizer, EMA), at the default model's recipe batch sizes.

Workloads, the `tiny` preset with all weights training, sampled from real files (the default model's data,
`scripts/prepare_default_data.py`):

- image: 32 images of 128x128 a step (the spatial stage, image batches only);
- video: 8 clips of 16 frames (every 4th) of 64x64 a step (video batches only).

Each is timed over `--steps` training steps after `--warmup` untimed ones, the device synchronised at both
ends: what a run spends per sample, data loading and host reads included. FLOPs per sample come from
`torch.utils.flop_counter` (forward and backward of the model), and the rate is set against the device's
measured dense matrix-multiply rate (bfloat16 on GPUs, float32 on CPUs): the fraction of the peak.

The same script measures an older trainer: put its package first on PYTHONPATH (`--label old`); options it
does not know (`--loader`, `--compile`) are left out of its config.

    python benchmarks/train_speed.py --data data/default --device cuda --loader resident --compile default \
        --label new --out docs/benchmarks/train_speed_h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

WORKLOADS = {
    "image": {"data": {"image_every": 1, "image_batch_size": 32, "batch_size": 32, "size": 128, "frames": 16},
              "unit": "images"},
    "video": {"data": {"image_every": 0, "batch_size": 8, "frames": 16, "stride": 4, "size": 64},
              "unit": "clips"},
}


def run_config(args, workload: str, output: Path) -> dict:
    data = {"videos": [str(args.data / "videos.csv")], "images": [str(args.data / "images.txt")],
            "workers": args.workers, **WORKLOADS[workload]["data"]}
    run = {"output": str(output), "steps": 10 ** 6, "progress": False, "export_model": False,
           "log_every": 10 ** 6, "checkpoint_every": 10 ** 6, "device": args.device, "precision": args.precision}
    if args.loader != "workers":
        data["loader"] = args.loader
    if args.compile != "none":
        run["compile"] = args.compile
    return {"run": run, "model": {"preset": "tiny", "sample_posterior": False}, "data": data,
            "loss": {"lpips": 0.0, "kl": 1e-6, "disc_start": 10 ** 9},
            "optim": {"lr": 1e-4, "betas": [0.9, 0.99], "grad_clip": 1.0, "ema_decay": 0.999}}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches_of(trainer):
    if hasattr(trainer, "_loader"):
        return trainer._loader()
    from cmvae.training.data import make_loader

    return iter(make_loader(trainer.dataset, 0, trainer.config.data.workers, trainer.config.data.prefetch))


def flops_per_sample(trainer, workload: str) -> float:
    """Forward + backward FLOPs of the model on one sample of the workload (its batch shape divided)."""
    from torch.utils.flop_counter import FlopCounterMode

    data = trainer.config.data
    size = WORKLOADS[workload]["data"]["size"]
    frames = 1 if workload == "image" else data.frames
    batch = data.image_batch_size if workload == "image" else data.batch_size
    x = torch.rand(batch, 3, frames, size, size, device=trainer.device) * 2 - 1
    counter = FlopCounterMode(display=False)
    with counter, trainer._autocast():
        out = trainer.model(x, sample_posterior=False)
        (out.sample.float() - x).abs().mean().backward()
    trainer.model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """Measured dense matrix-multiply FLOP/s: bfloat16 on a GPU, float32 on a CPU."""
    dtype, n, repeats = (torch.bfloat16, 8192, 20) if device.type == "cuda" else (torch.float32, 2048, 5)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - started), str(dtype).removeprefix("torch.")


def write_profile(trainer, batches, out: Path, steps: int = 2) -> None:
    """Where a training step's time goes: operators by their own time (children excluded), and the
    trainer's phases (data, forward, backward, optimizer, EMA) as recorded by `record_function`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step(batches)
        synchronize(trainer.device)
    sort = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{steps} steps; {platform.processor() or platform.machine()}, torch {torch.__version__}\n"
                   + prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))


def measure(args, workload: str, peak: float) -> dict:
    from cmvae.training import config_from_dict
    from cmvae.training.trainer import Trainer

    trainer = Trainer(config_from_dict(run_config(args, workload, args.scratch / f"{args.label}-{workload}")))
    batches = batches_of(trainer)
    started = time.perf_counter()
    for _ in range(args.warmup):
        trainer.train_step(batches)
    synchronize(trainer.device)
    warmup_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(batches)
    synchronize(trainer.device)
    seconds = time.perf_counter() - started
    if args.profile:
        write_profile(trainer, batches, args.profile.with_name(f"{args.profile.stem}-{workload}.txt"))
    data = trainer.config.data
    per_step = data.image_batch_size if workload == "image" else data.batch_size
    rate = per_step * args.steps / seconds
    flops = flops_per_sample(trainer, workload)
    precision = getattr(trainer, "precision", None)
    row = {"label": args.label, "workload": workload, "unit": WORKLOADS[workload]["unit"] + "/s",
           "samples_per_s": round(rate, 1), "seconds_per_step": round(seconds / args.steps, 4),
           "steps": args.steps, "warmup_steps": args.warmup, "warmup_seconds": round(warmup_seconds, 1),
           "gflop_per_sample": round(flops / 1e9, 2), "tflop_per_s": round(rate * flops / 1e12, 2),
           "fraction_of_peak": round(rate * flops / peak, 4), "loader": args.loader, "compile": args.compile,
           "precision": precision.describe() if precision else str(trainer.autocast_dtype)}
    trainer.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/default"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workloads", nargs="+", default=["image", "video"], choices=list(WORKLOADS))
    parser.add_argument("--loader", default="workers", choices=["workers", "resident"])
    parser.add_argument("--compile", default="none")
    parser.add_argument("--precision", default="auto", help="run.precision (an older trainer's auto may differ)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--label", default="new")
    parser.add_argument("--profile", type=Path, help="also profile two steps: PATH-WORKLOAD.txt, operators by own time")
    parser.add_argument("--scratch", type=Path, default=Path("runs/train-speed"))
    parser.add_argument("--out", type=Path, help="JSON file: rows are appended to what it holds")
    args = parser.parse_args()
    from cmvae.device import resolve_device

    device = resolve_device(args.device)
    args.device = str(device)
    peak, peak_dtype = matmul_peak(device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    record = json.loads(args.out.read_text()) if args.out and args.out.is_file() else {"rows": []}
    record.update(machine=f"{machine}, torch {torch.__version__}", peak_tflop_per_s=round(peak / 1e12, 1),
                  peak_dtype=peak_dtype)
    for workload in args.workloads:
        row = measure(args, workload, peak)
        print(json.dumps(row), flush=True)
        record["rows"].append(row)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
