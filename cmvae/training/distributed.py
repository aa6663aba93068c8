"""Processes under torchrun: the process group, the device of each rank, DDP and FSDP wrapping."""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..device import resolve_device


@dataclass
class Context:
    """Where this process stands: rank, world size, device, and how the model is wrapped."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"  # none, ddp, fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_objects(self, value) -> list:
        """`value` of every rank, in rank order (on every rank)."""
        if not self.distributed:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(tensor)
        return tensor.item() / self.world

    def close(self) -> None:
        if self.distributed:
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str, strategy: str, backend: str) -> Context:
    """Join the process group when torchrun started several processes; pick each rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy != "none" and "MASTER_ADDR" not in os.environ:
        raise ValueError(f"distributed.strategy={strategy} needs a launch by torchrun "
                         "(torchrun --nproc_per_node=N -m cmvae.cli train ...)")
    device = resolve_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if strategy != "none" and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return Context(rank=rank, world=world, local_rank=local_rank, device=device, strategy=strategy)


def wrap_ddp(module: nn.Module, context: Context, find_unused: bool) -> nn.Module:
    """DistributedDataParallel: gradients averaged over ranks in the backward pass."""
    from torch.nn.parallel import DistributedDataParallel

    if context.strategy == "none" or not any(p.requires_grad for p in module.parameters()):
        return module
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused)


def shard_fsdp(model: nn.Module) -> nn.Module:
    """FSDP (per-parameter sharding): each stage of the autoencoder is one unit, then the rest."""
    from torch.distributed.fsdp import fully_shard

    for name in ("encoder", "decoder", "encoder_temporal", "decoder_temporal"):
        fully_shard(getattr(model, name))
    fully_shard(model)
    return model


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool):
    """Skip the gradient all-reduce of a micro-batch that is not the last of an accumulation."""
    if enabled:
        yield
    elif hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield
