"""One `CrossModalVAE.decode` in a fresh process, for tests/test_diffusers.py, so that the process's peak
resident set is the decode's own.

    python tests/run_model_decode.py '{"latent": [1, 16, 2, 64, 64], "tiling": {"tile_sample_min_size": 128}, "output": "out.npy"}'

`tiling` null decodes untiled. Prints one JSON line: the peak resident set (VmHWM) before decoding (libraries,
weights and the latent in memory) and at the end.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from cmvae import CrossModalVAE
from cmvae.memory import peak_resident_bytes


def main(spec: dict) -> dict:
    torch.manual_seed(0)
    model = CrossModalVAE.from_preset("tiny").eval()
    latent = torch.randn(spec["latent"])
    if spec["tiling"] is not None:
        model.enable_tiling(**spec["tiling"])
    before = peak_resident_bytes()
    with torch.inference_mode():
        frames = model.decode(latent).sample
    peak = peak_resident_bytes()
    np.save(spec["output"], frames.numpy())
    return {"before": before, "peak": peak}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
