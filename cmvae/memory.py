"""Memory: budgets, what the process uses, and what tensors a piece of work holds at its peak.

- `parse_size("6GB")`: bytes (kB, MB, GB, TB are powers of 1000; KiB, MiB, GiB, TiB of 1024).
- `default_budget(device)`: what this process may use, from the machine: on a CPU its resident
  memory plus most of the memory still free, within its cgroup's limit where there is one; on a GPU
  the memory PyTorch holds plus most of the GPU's free memory.
- `memory_in_use(device)`: the process's resident set (CPU) or the memory held by tensors (CUDA):
  what the budget is measured against.
- `LiveTensors`: the peak bytes of tensors alive during a piece of work, on any device.
"""

from __future__ import annotations

import ctypes
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Of the memory found free, the share a default budget takes: room for other processes' growth,
# allocator fragmentation and what the estimates miss.
FREE_MEMORY_SHARE = 0.8

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """'6GB', '500MB', '1.5GiB' or a number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 6GB, 500MB or 1.5GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.0f} MB"


# ---- the process ------------------------------------------------------------------------------------


def resident_bytes() -> int:
    """The process's resident set now (Linux; 0 where /proc is missing)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _page_size()
    except (OSError, IndexError, ValueError):
        return 0


def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    """The process's resident-set high-water mark (VmHWM), since the start or `reset_peak_resident()`."""
    for line in _status_lines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_resident() -> bool:
    """Resets VmHWM to the current resident set (Linux 4.0+); False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_lines() -> list[str]:
    try:
        return Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return []


def return_free_memory() -> None:
    """Hands memory the C allocator keeps after frees back to the system (glibc), so that the resident
    set measures what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def return_large_frees_at_once() -> None:
    """Makes glibc map every allocation of 1 MiB or more on its own and unmap it when freed, instead of
    keeping freed blocks below a threshold that grows to 32 MiB: bands of rows, a few MiB each, would
    otherwise leave the resident set hundreds of MB above the tensors alive (measured on the default
    model). Process-wide; the pipeline calls it when it plans levels against a budget on the CPU."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 2**20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def memory_in_use(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return_free_memory()
    return resident_bytes()


# ---- what the machine has free -----------------------------------------------------------------------


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def _stat_value(path: Path, keys: tuple[str, ...]) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name in keys:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_free() -> int | None:
    """Memory left under the tightest cgroup limit over this process (v2 or v1), counting page cache
    it could reclaim as free; None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    free = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            root, limit, usage, stat, keys = Path("/sys/fs/cgroup"), "memory.max", "memory.current", "memory.stat", (
                "inactive_file",)
        elif "memory" in controllers.split(","):
            root, limit, usage, stat, keys = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", \
                "memory.usage_in_bytes", "memory.stat", ("total_inactive_file",)
        else:
            continue
        folder = root / path.lstrip("/")
        while True:
            cap, used = _read_int(folder / limit), _read_int(folder / usage)
            if cap is not None and used is not None and cap < 2**60:
                free.append(cap - used + _stat_value(folder / stat, keys))
            if folder == root or root not in folder.parents:
                break
            folder = folder.parent
    return min(free) if free else None


@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str  # where the figure came from, for the line the pipeline prints

    def describe(self) -> str:
        return f"memory budget {format_size(self.bytes)} ({self.source})"


def default_budget(device: torch.device) -> Budget:
    """What this process may use on `device`: what it uses now plus a share of what is free."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        idle = reserved - torch.cuda.memory_allocated(device)
        usable = torch.cuda.memory_allocated(device) + int(FREE_MEMORY_SHARE * (free + idle))
        return Budget(usable, f"{FREE_MEMORY_SHARE:.0%} of the GPU memory free")
    available = _meminfo_available()
    limited = cgroup_free()
    candidates = [v for v in (available, limited) if v is not None]
    if not candidates:
        return Budget(2**62, "no way to read free memory here: unlimited")
    free = min(candidates)
    where = "within the cgroup limit" if limited is not None and limited <= (available or limited) else "free RAM"
    return Budget(resident_bytes() + int(FREE_MEMORY_SHARE * free), f"{FREE_MEMORY_SHARE:.0%} of {where}")


# ---- tensors alive -----------------------------------------------------------------------------------


class LiveTensors(TorchDispatchMode):
    """Within the block, counts the bytes of tensor storages created and not yet freed, and their peak.

    Storages created before the block do not count. Allocations inside kernels are not seen, except
    the one that matters: oneDNN's CPU convolutions copy an input that is not channels-last into their
    own layout (a copy the size of the input, measured against the resident set).
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._track(tensor.untyped_storage())
        if func in _CONVOLUTIONS:
            self.peak = max(self.peak, self.current + _reordered_input_bytes(args[0]))
        return out

    def _track(self, storage) -> None:
        address = storage.data_ptr()
        if not address or address in self.live:
            return
        self.live[address] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, address)

    def _free(self, address: int) -> None:
        self.current -= self.live.pop(address, 0)


_CONVOLUTIONS = {torch.ops.aten.convolution.default, torch.ops.aten.conv3d.default, torch.ops.aten.conv2d.default,
                 torch.ops.aten.mkldnn_convolution.default}


def _reordered_input_bytes(x: torch.Tensor) -> int:
    if x.device.type != "cpu" or x.ndim < 4 or (x.shape[1] > 1 and x.stride(1) == 1):
        return 0
    return x.numel() * x.element_size()
