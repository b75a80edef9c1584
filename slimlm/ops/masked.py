"""Dense master weights with a masked forward: W~ = mask * W, as a torch parametrization.

The mask is a boolean buffer in the weight's *stored* orientation (GPT-2's Conv1D stores (in, out));
masks are always computed on the (out, in) view so that N:M groups run along the input dimension.
With `ste=True` the backward pass is straight-through (the gradient of W~ reaches every entry of W,
so pruned weights keep learning and can come back: AST); with `ste=False` pruned entries get no
gradient (fixed-mask fine-tuning, gradual magnitude pruning).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import sharded
from .first_order import masked_by_scores
from .sparsity import nm_mask


class _MaskSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, mask):
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class MaskedWeight(nn.Module):
    def __init__(self, mask: torch.Tensor, ste: bool):
        super().__init__()
        self.register_buffer("mask", mask.bool())
        self.ste = ste

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.ste:
            return _MaskSTE.apply(weight, self.mask)
        return weight * self.mask


class ScoredMask(MaskedWeight):
    """A mask chosen from learned scores (movement pruning): `scores` is a parameter the optimizer
    trains through the straight-through top-k (ops/first_order.py); the mask is refreshed from it."""

    def __init__(self, mask: torch.Tensor, scores: torch.Tensor):
        super().__init__(mask, ste=False)
        self.scores = nn.Parameter(scores.float())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return masked_by_scores(weight, self.scores, self.mask)


def is_transposed(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as (in, out)."""
    return not isinstance(module, nn.Linear)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The trainable dense weight, in stored orientation, with or without a mask attached."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def as_out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t() if is_transposed(module) else tensor


def magnitude_nm_mask(module: nn.Module, n: int, m: int, keep_per_group: int | None = None,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """Magnitude N:M mask of the module's current dense weight (or of `weight`, same layout), in stored
    orientation. `keep_per_group` overrides n (gradual pruning passes through 4:4, 3:4, 2:4)."""
    return score_nm_mask(module, keep_per_group if keep_per_group is not None else n, m, weight=weight)


def score_nm_mask(module: nn.Module, n: int, m: int, input_scale: torch.Tensor | None = None,
                  margin: float | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """N:M mask of the score |W| (magnitude) or |W_ij| * input_scale_j (activation-aware: input_scale =
    ||x_j||, Wanda's score), of the module's dense weight (or `weight`, same layout), in stored
    orientation. `margin`: hysteresis against the module's current mask (sparsity.nm_mask); None: no
    incumbent. A row-sharded (FSDP) weight: each rank masks its own rows, then the row masks are
    all-gathered (never the weights); a weight sharded across its inputs is gathered first."""
    stored = dense_weight(module).detach() if weight is None else weight
    if sharded.is_sharded(stored) and sharded.shard_dim(stored) != (1 if is_transposed(module) else 0):
        stored = sharded.full(stored)  # sharded across the inputs (see distributed._row_placements)
    rows = as_out_in(module, sharded.local(stored))
    scores = rows.abs().float()
    if input_scale is not None:
        scores = scores * input_scale.to(scores.device).reshape(1, -1)
    incumbent = None
    if margin is not None:
        incumbent = as_out_in(module, sharded.local(sharded.shard_like(get_mask(module), stored)))
    mask = as_out_in(module, nm_mask(scores, n, m, incumbent=incumbent, margin=margin or 0.0))
    return sharded.gather_like(mask, stored)


def attach_mask(module: nn.Module, mask: torch.Tensor, ste: bool) -> None:
    parametrize.register_parametrization(module, "weight", MaskedWeight(mask, ste), unsafe=True)


def attach_scored_mask(module: nn.Module, mask: torch.Tensor, scores: torch.Tensor) -> None:
    parametrize.register_parametrization(module, "weight", ScoredMask(mask, scores), unsafe=True)


def is_masked(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight")


def get_mask(module: nn.Module) -> torch.Tensor:
    return module.parametrizations.weight[0].mask


def set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    get_mask(module).copy_(mask)


def refresh_masks(targets: dict[str, nn.Module], new_mask) -> float:
    """Set every target's mask to new_mask(module); returns the fraction of mask entries that flipped."""
    flips = total = 0
    for module in targets.values():
        old, new = get_mask(module), new_mask(module)
        flips += int((new != old).sum())
        total += old.numel()
        set_mask(module, new)
    return flips / total


def bake_mask(module: nn.Module) -> None:
    """Replace the parametrization by the plain weight mask * W, with exact zeros."""
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in). GPT-2's Conv1D stores (in, out): return a transposed *view*, so
    in-place edits (masking, copy_) write through to the parameter. A factorized layer: A @ B."""
    from .factorized import LowRankLinear  # factorized.py needs nothing of this module at import

    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, LowRankLinear):
        return module.merged_weight()
    return module.weight.t()
