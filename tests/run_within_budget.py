"""One reconstruction in a fresh process, for tests/test_memory_budget.py, so that the process's peak
resident set is the run's own.

    python tests/run_within_budget.py '{"frames": 8, "height": 256, "width": 256, "settings": {"tile": 0}, "output": "out.npy"}'

Prints one JSON line: the peak resident set (VmHWM) before the reconstruction (libraries and weights
loaded) and at the end, and how each level ran.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from media import moving_pattern  # noqa: E402

from cmvae import CrossModalVAE  # noqa: E402
from cmvae.pipeline import PipelineSettings, VideoPipeline  # noqa: E402


def peak_resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(spec: dict) -> dict:
    torch.manual_seed(0)
    model = CrossModalVAE.from_preset("tiny")
    frames = moving_pattern(spec["frames"], spec["height"], spec["width"])
    pipe = VideoPipeline(model, PipelineSettings(device="cpu", dtype="float32", **spec["settings"]))
    before = peak_resident_bytes()
    np.save(spec["output"], pipe.reconstruct_array(frames))
    levels = [record.how for record in pipe.levels.records] if pipe.levels is not None else []
    return {"before": before, "peak": peak_resident_bytes(), "levels": levels}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
