"""Speed of one training step of the model alone (no data loading), in each memory layout (`run.memory_format`).

A step is what `cmvae train` does with a batch: forward under autocast, L1 + KL, backward, gradient
clipping, Adam. Random pixels stand in for data: the cost does not depend on them. Layouts: `contiguous`
(channels-first, PyTorch's default) and `channels-last` (`torch.channels_last_3d` weights and batches).

    python benchmarks/train_step_speed.py --device cuda --out docs/benchmarks/train_step_speed.json
    python benchmarks/train_step_speed.py --device cpu --image 4x64 --video 1x8x32 --steps 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cmvae.models import CrossModalVAE, preset
from cmvae.training.start import select_trainable

VARIANTS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last_3d}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or "CPU"


def step_seconds(model: CrossModalVAE, x: torch.Tensor, optimizer: torch.optim.Optimizer, dtype: torch.dtype | None,
                 steps: int, warmup: int) -> float:
    """Mean wall time of one training step (synchronised) after `warmup` untimed steps."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x, sample_posterior=False)
            loss = (out.sample.float() - x).abs().mean() + 1e-6 * out.latent_dist.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    for _ in range(warmup):
        step()
    synchronize(x.device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(x.device)
    return (time.perf_counter() - started) / steps


def print_profile(model, x, optimizer, dtype, title: str, steps: int = 3) -> None:
    """The operators that took the most time over `steps` steps (torch.profiler)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if x.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        step_seconds(model, x, optimizer, dtype, steps, 0)
    key = "cuda_time_total" if x.device.type == "cuda" else "cpu_time_total"
    print(f"## profile: {title}, {steps} steps")
    print(profiler.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, variant: str, workload: str) -> dict:
    layout = VARIANTS[variant]
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = CrossModalVAE.from_cmvae_config(preset(args.preset)).to(device, memory_format=layout).train()
    if workload == "image":
        batch, side = (int(v) for v in args.image.split("x"))
        shape, trainable = (batch, 3, 1, side, side), ["all"]
    else:
        batch, frames, side = (int(v) for v in args.video.split("x"))
        shape, trainable = (batch, 3, frames, side, side), ["temporal"]
    select_trainable(model, trainable)
    x = (torch.rand(shape, device=device) * 2 - 1).contiguous(memory_format=layout)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    seconds = step_seconds(model, x, optimizer, dtype, args.steps, args.warmup)
    if args.profile:
        print_profile(model, x, optimizer, dtype, f"{workload}, {variant}")
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return {"variant": variant, "workload": workload, "shape": list(shape), "trainable": trainable[0],
            "dtype": args.dtype, "seconds_per_step": round(seconds, 4), "samples_per_s": round(batch / seconds, 1),
            "peak_gib": None if memory is None else round(memory, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--image", default="32x128", help="image batches: BATCHxSIDE (all parameters train)")
    parser.add_argument("--video", default="8x16x64", help="video batches: BATCHxFRAMESxSIDE (temporal parts train)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of each case")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    torch.backends.cudnn.benchmark = True
    rows = []
    for workload in ("image", "video"):
        for variant in args.variants:
            try:
                rows.append(measure(args, variant, workload))
            except (RuntimeError, ValueError) as error:  # e.g. out of memory, or a layout a backend refuses
                rows.append({"variant": variant, "workload": workload, "error": str(error).splitlines()[0]})
    machine = f"{device_name(torch.device(args.device))}, torch {torch.__version__}"
    print(f"{machine}, preset {args.preset}, {args.dtype}")
    print("| workload | shape | variant | s/step | samples/s | peak GiB |\n|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['workload']} | | {row['variant']} | failed: {row['error']} | | |")
            continue
        print(f"| {row['workload']} ({row['trainable']} train) | {'x'.join(map(str, row['shape']))} | {row['variant']} "
              f"| {row['seconds_per_step']} | {row['samples_per_s']} | {row['peak_gib']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "preset": args.preset, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
