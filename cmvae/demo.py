"""The main job until a trained default model ships: encode and decode a photograph (image mode) and
a clip panned across it (video mode) with a preset, and report shapes and PSNR."""

from __future__ import annotations

import time

import torch

from .metrics import psnr
from .models import CrossModalVAE
from .samples import panning_clip, photograph


def run_demo(preset: str = "tiny", size: int = 128, frames: int = 16, seed: int = 0, out=print) -> dict:
    torch.manual_seed(seed)
    model = CrossModalVAE.from_preset(preset).eval()
    if model.cfg.has_text:
        from .text import minilm

        model.set_text_encoder(minilm())
    photo = photograph("astronaut", size)
    inputs = {"image": photo[:, None][None], "video": panning_clip(photograph("astronaut", 2 * size), frames, size)[None]}
    params = sum(p.numel() for p in model.parameters())
    out(f"model: preset {preset!r}, {params / 1e6:.1f}M parameters, random weights (untrained: expect a low PSNR)")
    results = {}
    for mode, x in inputs.items():
        start = time.perf_counter()
        with torch.no_grad():
            latent = model.encode(x).latent_dist.mode()
            recon = model.decode(latent).sample
        seconds = time.perf_counter() - start
        results[mode] = psnr(x, recon)
        out(f"{mode:5s}: input {tuple(x.shape)} -> latent {tuple(latent.shape)} -> output {tuple(recon.shape)}; "
            f"PSNR {results[mode]:.2f} dB; {seconds:.2f} s")
    return results
