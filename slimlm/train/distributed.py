"""Training on several processes with PyTorch's own engine: torchrun sets RANK / WORLD_SIZE /
LOCAL_RANK, we join the process group (gloo on CPU, nccl on CUDA), then either

- DDP (`parallel.strategy: ddp`): every rank holds the whole model; DDP all-reduces (averages) the
  gradients, so every rank takes the same step and holds the same weights. Masks recomputed from those
  weights (AST), scores accumulated from those gradients (movement) and draws seeded by the step
  (mixed-rank) are identical on every rank without any code of ours. Or
- FSDP2 (`parallel.strategy: fsdp`, `fully_shard` per transformer block and at the root): every
  parameter, its gradient and its optimizer states are row shards (DTensors). The methods see them
  through slimlm/ops/sharded.py: N:M masks from each rank's own rows, all-gathered; the decay term and
  movement scores on the rank's rows; a movement top-k over the gathered scores. Export and LPAF's
  factorization work on a plain copy of the model gathered into a skeleton taken before sharding.

Logging, checkpoints' metadata and the published folder are written by rank 0 only.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn

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


def rank_share(indices: list[int], batch_size: int) -> list[int]:
    """This rank's contiguous share of a global batch (the recipe's batch size is the global one)."""
    rank, size = world()
    if batch_size % size:
        raise SlimlmError(f"train.batch_size={batch_size} does not split over {size} processes: use a multiple of {size}")
    per = batch_size // size
    return indices[rank * per:(rank + 1) * per]


def uses_fsdp(parallel: dict) -> bool:
    return world()[1] > 1 and parallel["strategy"] == "fsdp"


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


# -- FSDP2 ---------------------------------------------------------------------------------------

def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of the model's structure (masks, SLoRB paths, factorized layers included) whose
    parameters and saved buffers live on the meta device: no memory. Non-persistent buffers (rotary
    frequencies), which no state dict carries, are copied for real."""
    memo = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for name, b in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _row_placements(model: nn.Module):
    """Every parameter is sharded along its output rows: dim 0, except GPT-2's Conv1D weights, stored
    (in, out), which are sharded along dim 1. N:M groups (along a row) then never straddle two ranks.
    FSDP2 shards dim 1 only evenly: a Conv1D whose outputs do not split over the ranks is sharded along
    dim 0 instead, and its masks are computed from the gathered weight (masked.magnitude_nm_mask)."""
    from transformers.pytorch_utils import Conv1D
    from torch.distributed.tensor import Shard

    from ..ops.masked import dense_weight

    size = world()[1]
    by_columns = {id(dense_weight(m)) for m in model.modules()
                  if isinstance(m, Conv1D) and dense_weight(m).shape[1] % size == 0}
    return lambda p: Shard(1) if id(p) in by_columns else Shard(0)


def fully_shard_model(model: nn.Module, parallel: dict, device: str) -> nn.Module:
    """Shard the model in place with FSDP2: one unit per transformer block (gathered for its forward
    and backward only), the rest at the root. Returns the meta skeleton for gather_full_model."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from ..models import find_blocks

    if parallel["cpu_offload"] and not device.startswith("cuda"):
        raise SlimlmError("parallel.cpu_offload keeps GPU shards in CPU memory: it needs train.device=cuda")
    skeleton = meta_skeleton(model)
    options = dict(
        mp_policy=(MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                   if parallel["mixed_precision"] == "bf16" else MixedPrecisionPolicy()),
        offload_policy=CPUOffloadPolicy() if parallel["cpu_offload"] else OffloadPolicy(),
        shard_placement_fn=_row_placements(model))
    _, blocks = find_blocks(model)
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return skeleton


def is_fully_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gather_full_model(model: nn.Module, skeleton: nn.Module, everywhere: bool) -> nn.Module | None:
    """The sharded model's full state loaded into its skeleton: a plain module. On every rank when
    `everywhere` (LPAF factorizes between its stages), else on rank 0 only, in CPU memory (export),
    and None on the other ranks. Every rank must call it (it all-gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))
    if not everywhere and not is_main():
        return None
    shared = shared_parameters(skeleton)
    skeleton.load_state_dict(state, assign=True)
    for name, owner in shared.items():  # assign=True unties tied weights (embeddings and LM head): tie again
        parent, _, attr = name.rpartition(".")
        setattr(skeleton.get_submodule(parent), attr, skeleton.get_parameter(owner))
    return skeleton.to(next(iter(state.values())).device)


def shared_parameters(model: nn.Module) -> dict[str, str]:
    """{name: name of the first module holding the same parameter} for every repeated parameter."""
    first, shared = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            shared[name] = first[id(p)]
        else:
            first[id(p)] = name
    return shared
