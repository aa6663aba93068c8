"""Choosing the device, dtype and memory layout that are fast on the machine at hand."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_has_fast_bfloat16() -> bool:
    """True where the CPU computes bfloat16 natively (AMX or AVX-512 BF16).

    Without them PyTorch emulates bfloat16 and float16 convolutions, which measured about 65x
    slower than float32 on an AVX2-only AMD EPYC (see docs/benchmarks.md).
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    return device


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose float32, bfloat16 or float16") from None


def fast_low_precision(device: torch.device) -> torch.dtype | None:
    """The reduced precision worth using on `device` for speed, or None where float32 is fastest."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bfloat16() else None


def preferred_memory_format(device: torch.device, dtype: torch.dtype) -> torch.memory_format:
    """Channels-last 3D where it pays: bfloat16/float16 convolutions on GPUs and AMX CPUs."""
    if dtype in (torch.bfloat16, torch.float16) and (device.type == "cuda" or cpu_has_fast_bfloat16()):
        return torch.channels_last_3d
    return torch.contiguous_format
