"""Data-parallel training on PyTorch's own engine: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK,
we join the process group (gloo on CPU, nccl on CUDA) and wrap the model in DDP.

Why the methods need nothing special under DDP: DDP all-reduces (averages) the gradients in
backward, so every rank sees the same gradients, takes the same optimizer step and holds the same
weights; masks recomputed from those weights (AST), scores accumulated from those gradients
(movement) and random draws seeded by the step (mixed-rank) are then identical on every rank.
Logging, evaluation, checkpoints and export happen on rank 0 only.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..errors import SlimlmError


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


def init(device: str) -> str:
    """Join the torchrun process group when there is one; returns the device this rank uses."""
    rank, size = world()
    if size == 1:
        return device
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def shard(indices: list[int], batch_size: int) -> list[int]:
    """This rank's contiguous share of a global batch (the recipe's batch size is the global one)."""
    rank, size = world()
    if batch_size % size:
        raise SlimlmError(f"train.batch_size={batch_size} does not split over {size} processes: use a multiple of {size}")
    per = batch_size // size
    return indices[rank * per:(rank + 1) * per]


def wrap(model):
    """DDP around the model when running on several processes (the model itself otherwise)."""
    if world()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # find_unused_parameters: mixed-rank layers run one of two paths per step; buffers (masks,
    # scores) are equal on every rank by construction, so they are not broadcast
    return DistributedDataParallel(model, find_unused_parameters=True, broadcast_buffers=False)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average logged numbers over ranks, so rank 0 logs the global batch's values."""
    if world()[1] == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world()[1] for k, v in zip(keys, t)}


def sum_over_ranks(value: int) -> int:
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return int(t.item())


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
