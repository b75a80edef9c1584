"""Modules for factorized layers (LPAF stage 3): the final low-rank layer and the mixed-rank layer
that fine-tuning moves from the sparse weight to the low-rank factors.

Factorization always works on the (out, in) view of a weight. GPT-2's Conv1D stores (in, out) and
computes x @ W + b, which is the same function as a Linear with W^T, so a LowRankLinear can replace
either kind of layer; `linear_view` gives the (out, in) weight and bias of both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowRankLinear(nn.Module):
    """y = A (B x) + b with B = down.weight (rank x in) and A = up.weight (out x rank).

    `active_rank` (None = all) restricts the forward to the first components (rows of B, columns of A):
    the rank-sampling variant of mixed-rank fine-tuning. SVD factors are ordered by singular value, so
    the first r' components are the best rank-r' truncation of the layer.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        self.active_rank: int | None = None

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """The layer computing x @ (A @ B)^T + bias, for A (out x r) and B (r x in)."""
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
            raise ValueError(f"factors of shapes {tuple(A.shape)} and {tuple(B.shape)} do not multiply")
        layer = cls(B.shape[1], A.shape[0], A.shape[1], bias=bias is not None, device=A.device, dtype=A.dtype)
        with torch.no_grad():
            layer.up.weight.copy_(A)
            layer.down.weight.copy_(B)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    def _components(self) -> int:
        if self.active_rank is None or self.active_rank >= self.rank:
            return self.rank
        if self.active_rank < 1:
            raise ValueError(f"active_rank must be at least 1, got {self.active_rank}")
        return self.active_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self._components()
        if r == self.rank:
            return self.up(self.down(x))
        return F.linear(F.linear(x, self.down.weight[:r]), self.up.weight[:, :r], self.up.bias)

    def merged_weight(self) -> torch.Tensor:
        """A @ B, the (out, in) weight the forward computes (over the active components)."""
        r = self._components()
        return self.up.weight[:, :r] @ self.down.weight[:r]

    def extra_repr(self) -> str:
        active = f", active_rank={self.active_rank}" if self.active_rank is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.up.bias is not None}{active}")


class MixedRankLinear(nn.Module):
    """One layer with two interchangeable paths for mixed-rank fine-tuning: the sparse weight
    (forward with weight * mask) and its low-rank factors. The trainer sets `use_lowrank` each step.

    The bias is shared: it is a parameter of this module and both paths add it, so the layer keeps one
    bias whichever path a step takes (the `lowrank` module must therefore have no bias of its own).
    Pruned weights get no gradient: the bool mask zeroes them in the product.
    """

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
                 lowrank: LowRankLinear):
        super().__init__()
        shape = (lowrank.out_features, lowrank.in_features)
        if tuple(weight.shape) != shape or tuple(mask.shape) != shape:
            raise ValueError(f"weight {tuple(weight.shape)} and mask {tuple(mask.shape)} must have the low-rank "
                             f"layer's (out, in) shape {shape}")
        if lowrank.up.bias is not None:
            raise ValueError("build the low-rank layer with bias=False: the bias is shared and lives here")
        self.weight = nn.Parameter(weight.detach().clone())
        self.register_buffer("mask", mask.detach().bool().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.lowrank = lowrank
        self.use_lowrank = False

    @property
    def in_features(self) -> int:
        return self.lowrank.in_features

    @property
    def out_features(self) -> int:
        return self.lowrank.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_lowrank:
            y = self.lowrank(x)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight * self.mask, self.bias)

    def to_lowrank(self) -> LowRankLinear:
        """The final pure low-rank layer (full rank, the shared bias in up.bias), with its own tensors."""
        bias = self.bias.detach() if self.bias is not None else None
        return LowRankLinear.from_factors(self.lowrank.up.weight.detach(), self.lowrank.down.weight.detach(), bias)

    def extra_repr(self) -> str:
        return f"use_lowrank={self.use_lowrank}, kept={int(self.mask.sum())}/{self.mask.numel()}"


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    """Set the submodule at dotted path `name` (e.g. 'model.layers.0.mlp.up_proj')."""
    if not name:
        raise ValueError("cannot replace the model itself")
    model.get_submodule(name)  # a clear error when the path does not exist
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new_module)


def linear_view(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as (out, in), bias) of an nn.Linear or a transformers Conv1D, detached. A masked layer
    (parametrized weight) gives its masked weight."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        weight = module.weight.detach()
    elif isinstance(module, Conv1D):
        weight = module.weight.detach().t()
    else:
        raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")
    return weight, module.bias.detach() if module.bias is not None else None
