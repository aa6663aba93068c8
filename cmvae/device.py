"""Choosing the device, dtype and memory layout that are fast on the machine at hand.

One decision for training and inference: `resolve_precision` turns `auto` (or an explicit dtype)
into a `Precision` (dtype, memory layout, and why), from the hardware:

- CUDA GPUs: bfloat16 (float16 where bfloat16 is unsupported), channels-last 3D;
- CPUs with native bfloat16 (AMX or AVX-512 BF16): bfloat16, channels-last 3D;
- other CPUs (AVX2 only): float32, contiguous. PyTorch emulates bfloat16 there, and a convolution
  measured about 65x slower than in float32 on an AVX2-only AMD EPYC (docs/benchmarks.md).

The environment variable `CMVAE_CPU_BF16` overrides the CPU detection: `1` resolves as on a CPU
with native bfloat16, `0` as on an AVX2-only CPU (the test suite runs both ways).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_ENV = "CMVAE_CPU_BF16"


@functools.cache
def _cpuinfo_has_bfloat16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_has_fast_bfloat16() -> bool:
    """True where the CPU computes bfloat16 natively (AMX or AVX-512 BF16), or `CMVAE_CPU_BF16=1`."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"{CPU_BF16_ENV} must be 0 or 1, got {forced!r}")
    return _cpuinfo_has_bfloat16()


def cpu_kind() -> str:
    """A short description of the CPU's bfloat16 support, for logs."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    native = "native bfloat16" if cpu_has_fast_bfloat16() else "no native bfloat16"
    return f"CPU with {native}" + (f" ({CPU_BF16_ENV}={forced})" if forced else "")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {str(name)!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(name)!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
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
    """Channels-last 3D where it pays: bfloat16/float16 convolutions on GPUs and CPUs with native bfloat16."""
    if dtype in (torch.bfloat16, torch.float16) and (device.type == "cuda" or cpu_has_fast_bfloat16()):
        return torch.channels_last_3d
    return torch.contiguous_format


@dataclass(frozen=True)
class Precision:
    """A resolved precision: the compute dtype, the memory layout of 5D tensors, and why."""

    dtype: torch.dtype
    memory_format: torch.memory_format
    reason: str

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def layout_name(self) -> str:
        return "channels_last" if self.memory_format == torch.channels_last_3d else "contiguous"

    def describe(self) -> str:
        return f"{self.dtype_name}, {self.layout_name} ({self.reason})"


def resolve_precision(name: str | torch.dtype = "auto", device: torch.device | str = "cpu",
                      memory_format: str = "auto", training: bool = False) -> Precision:
    """`auto` or a dtype name, and `auto`, `channels_last` or `contiguous`, resolved for `device`.

    Training on a CPU resolves `auto` to float32 even where the CPU computes bfloat16 natively: there,
    backward passes under bfloat16 autocast crashed (segmentation fault) or ran for minutes on batches
    that take a second in float32 (torch 2.14.1, a Xeon with AMX; docs/training.md)."""
    device = torch.device(device)
    if training and device.type == "cpu" and name == "auto":
        return Precision(torch.float32, _layout(memory_format, device, torch.float32),
                         "auto: CPU training runs in float32")
    if isinstance(name, torch.dtype) or name != "auto":
        dtype = resolve_dtype(name)
        reason = "asked for"
        if dtype != torch.float32 and device.type == "cpu" and not cpu_has_fast_bfloat16():
            reason = "asked for; emulated on this CPU (no native bfloat16): much slower than float32"
    else:
        dtype = fast_low_precision(device) or torch.float32
        where = "GPU" if device.type == "cuda" else cpu_kind()
        reason = f"auto: {where}"
    return Precision(dtype, _layout(memory_format, device, dtype), reason)


def _layout(memory_format: str, device: torch.device, dtype: torch.dtype) -> torch.memory_format:
    if memory_format == "auto":
        return preferred_memory_format(device, dtype)
    if memory_format in ("channels_last", "contiguous"):
        return torch.channels_last_3d if memory_format == "channels_last" else torch.contiguous_format
    raise ValueError(f"unknown memory format {memory_format!r}; choose auto, channels_last or contiguous")
