"""LPAF after pruning: factorize each target matrix (plain, Fisher-weighted or sparsity-aware SVD),
then mixed-rank fine-tuning as engine hooks, then export as low-rank (or merged dense) layers.

Mixed-rank fine-tuning (METHODS.md, our choice): for the first `mixed_fraction` of the fine-tuning
steps each layer runs its low-rank factors with probability p(t), rising linearly to 1, and its
sparse matrix otherwise, so the network moves from sparse to low-rank gradually; afterwards only
the factors run. The alternative (`mixed: rank`) always runs the factors but samples a rank
r' in [p(t) r, r] per layer and step. The random draws are a pure function of (seed, step), so a
resumed run draws what the uninterrupted run drew.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import masked
from ..factorized import LowRankLinear, MixedRankLinear, linear_view, replace_module
from ..lowrank import factorize, rank_for_budget
from .distill import distill_loss
from .engine import Hooks


def fisher_information(model, targets: dict, batches: list[dict], loss_fn) -> dict[str, torch.Tensor]:
    """Empirical Fisher of each target weight: the sum over batches of squared gradients, (out, in)."""
    fisher = {name: torch.zeros_like(linear_view(m)[0], dtype=torch.float32) for name, m in targets.items()}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model, batch)
        loss.backward()
        for name, module in targets.items():
            grad = masked.dense_weight(module).grad
            if grad is not None:
                fisher[name] += masked.as_out_in(module, grad).float() ** 2
    model.zero_grad(set_to_none=True)
    return fisher


@torch.no_grad()
def factorize_targets(model, targets: dict, keep: float, method: str, iters: int,
                      fisher: dict | None = None, pruned_weight: float = 0.0) -> dict[str, MixedRankLinear]:
    """Replace every target by a MixedRankLinear holding its (masked) weight and rank-r factors, with
    r from the parameter budget `keep`. A target pruned by movement brings its mask and scores."""
    layers = {}
    for name, module in targets.items():
        weight, bias = linear_view(module)  # masked weight when a mask is attached
        if masked.is_masked(module):
            mask = masked.as_out_in(module, masked.get_mask(module))
            scores = getattr(module.parametrizations.weight[0], "scores", None)
            scores = masked.as_out_in(module, scores) if scores is not None else None
        else:
            mask, scores = torch.ones_like(weight, dtype=torch.bool), None
        rank = rank_for_budget(weight.shape[0], weight.shape[1], keep)
        A, B = factorize(method, weight, rank, mask=mask, scores=scores,
                         fisher=fisher[name] if fisher else None, iters=iters, pruned_weight=pruned_weight)
        layer = MixedRankLinear(weight, mask, bias, LowRankLinear.from_factors(A, B, None))
        layer.original_type = type(module)  # what a merged export writes back
        replace_module(model, name, layer)
        layers[name] = layer
    return layers


class MixedRankTraining(Hooks):
    def __init__(self, recipe: dict, layers: dict[str, MixedRankLinear], teacher, total_steps: int):
        self.recipe, self.cfg = recipe, recipe["method"]
        self.lp = self.cfg["lpaf"]
        self.layers, self.teacher, self.total_steps = layers, teacher, total_steps
        self.mixed_steps = int(self.lp["mixed_fraction"] * total_steps) if self.lp["mixed"] != "none" else 0
        self.p = 1.0

    def before_forward(self, step: int) -> None:
        self.p = min(1.0, (step + 1) / self.mixed_steps) if step < self.mixed_steps else 1.0
        g = torch.Generator().manual_seed(self.recipe["seed"] * 1_000_003 + step)
        for layer in self.layers.values():
            if self.p >= 1.0:
                layer.use_lowrank, layer.lowrank.active_rank = True, None
            elif self.lp["mixed"] == "probability":
                layer.use_lowrank = bool(torch.rand((), generator=g) < self.p)
            else:  # rank: always the factors, a random rank in [ceil(p r), r]
                r = layer.lowrank.rank
                low = max(1, math.ceil(self.p * r))
                layer.use_lowrank = True
                layer.lowrank.active_rank = int(torch.randint(low, r + 1, (), generator=g))

    def loss(self, model, batch):
        return distill_loss(model, self.teacher, batch, self.cfg["distill"])

    def after_step(self, step: int) -> dict:
        return {"lowrank_prob": self.p}

    @torch.no_grad()
    def export(self, model) -> dict:
        """Only the factors remain: LowRankLinear layers (ranks in config.slimlm_lowrank), or, with
        lpaf.merge, A @ B written back into plain layers of the original type (a stock checkpoint)."""
        ranks = {}
        self.layers = {name: model.get_submodule(name) for name in self.layers}  # FSDP: a gathered copy
        for name, layer in self.layers.items():
            final = layer.to_lowrank()
            if self.lp["merge"]:
                final = _plain_layer(layer.original_type, final)
            else:
                ranks[name] = final.rank
            replace_module(model, name, final)
        if ranks:
            model.config.slimlm_lowrank = ranks
        return {"lowrank_ranks": ranks or None, "merged": self.lp["merge"]}


def _plain_layer(kind: type, lowrank: LowRankLinear) -> nn.Module:
    """A dense layer of the original class (nn.Linear or GPT-2's Conv1D) computing the factors' function."""
    from transformers.pytorch_utils import Conv1D

    weight, bias = lowrank.merged_weight(), lowrank.up.bias
    if kind is Conv1D:
        layer = Conv1D(lowrank.out_features, lowrank.in_features)
        layer.weight.copy_(weight.t())
    else:
        layer = nn.Linear(lowrank.in_features, lowrank.out_features, bias=bias is not None)
        layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer.to(weight.device, weight.dtype)
