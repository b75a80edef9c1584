"""Tensors that may be row shards of a parameter (FSDP2 DTensors), and full tensors beside them.

Under FSDP2 every parameter is a DTensor: each rank stores a contiguous block of rows (torch.chunk
along the shard dimension; the last ranks' blocks may be shorter or empty). slimlm shards every weight
along its output rows (see train/distributed.py), and N:M groups run along a row, so a rank can compute
the masks of its own rows from its own shard. Masks themselves stay full on every rank, because the
forward pass multiplies them with the gathered (full) weight. These helpers move between the two:
they are no-ops on plain tensors, so single-process code calls them unconditionally.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Shard


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows (the tensor itself when not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (all-gather of a sharded one)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_dim(like: DTensor) -> int:
    (placement,) = like.placements
    if not isinstance(placement, Shard):
        raise ValueError(f"expected a row-sharded DTensor, got placements {like.placements}")
    return placement.dim


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` (same shape as `like`, present in full on every rank) cut to the rows this rank holds
    of `like`, as a DTensor sharded like it; `whole` itself when `like` is not sharded. A view: no copy,
    no communication."""
    if not isinstance(like, DTensor):
        return whole
    if whole.shape != like.shape:
        raise ValueError(f"shape {tuple(whole.shape)} does not match the sharded tensor's {tuple(like.shape)}")
    dim = shard_dim(like)
    rows = like.to_local().shape[dim]
    chunk = -(-like.shape[dim] // like.device_mesh.size())  # torch.chunk: ceil(n / world) rows per rank
    start = min(like.device_mesh.get_local_rank() * chunk, like.shape[dim])
    part = whole.narrow(dim, start, rows).to(like.to_local().device)
    return DTensor.from_local(part, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def gather_like(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full tensor from every rank's `part` (this rank's rows, shaped like `like`'s local shard);
    `part` itself when `like` is not sharded. Bool tensors travel as uint8 (gloo has no bool)."""
    if not isinstance(like, DTensor):
        return part
    is_bool = part.dtype == torch.bool
    sharded = DTensor.from_local(part.to(torch.uint8) if is_bool else part, like.device_mesh, like.placements,
                                 run_check=False, shape=like.shape, stride=like.stride())
    whole = sharded.full_tensor()
    return whole.bool() if is_bool else whole
