"""Data-parallel training under ``torchrun``: process-group set-up from torchrun's environment variables.

The same command runs alone or as ``torchrun --nproc_per_node N -m hybridlm.cli train ...``: with
``WORLD_SIZE > 1`` each process joins a group (gloo on CPU, nccl on GPUs) and wraps the model in
DistributedDataParallel, which averages gradients across processes after every backward pass.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over all processes (itself when alone)."""
        if self.world_size == 1:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / self.world_size

    def barrier(self) -> None:
        """Wait until every process gets here (nothing when alone). A gloo process that destroyed its group while
        another was still working on its own aborted at exit ("terminate called without an active exception")."""
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Destroy the group this process joined, and free it. Gloo's threads stop only when the group object is
        freed, and one still running at interpreter exit can abort the process after a successful run
        ("terminate called without an active exception"); DTensor's caches (FSDP's parameters are DTensors) keep
        device meshes, and through them the group, alive after ``destroy_process_group``."""
        if not (self.initialized_here and dist.is_initialized()):
            return
        _clear_dtensor_caches()
        gc.collect()
        dist.destroy_process_group()


def _clear_dtensor_caches() -> None:
    """Empty the caches of ``torch.distributed.tensor`` that hold device meshes: the functools caches of its
    modules, the redistribution planners and the C++ sharding-propagation cache (torch 2.13; a torch without
    one of them has nothing there to free)."""
    if "torch.distributed.tensor" not in sys.modules:  # never imported: nothing cached
        return
    for obj in gc.get_objects():
        if (isinstance(obj, functools._lru_cache_wrapper)
                and str(getattr(obj, "__module__", "")).startswith("torch.distributed.tensor")):
            obj.cache_clear()
    with contextlib.suppress(ImportError, AttributeError):
        from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache

        clear_redistribute_planner_cache()
    with contextlib.suppress(AttributeError):
        torch._C._clear_DTensor_sharding_propagator_cache()


def setup(device: str | None = None) -> Distributed:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``...), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world == 1:
        return Distributed(device=dev)
    initialized_here = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        initialized_here = True
    return Distributed(rank=rank, world_size=world, device=dev, initialized_here=initialized_here)
