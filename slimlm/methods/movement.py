"""Movement pruning (first-order, Sanh et al. 2020): LPAF's first stage, or a method of its own
(recipe `movement`).

Every target weight W gets a mask (forward W * M) and a score S that accumulates -W * dL/dW' over the
steps, where W' = W * M is what the forward used (the straight-through gradient reaches every entry,
kept or not). The mask keeps the top `keep(t)` fraction of each matrix by score; keep(t) falls from 1
to method.keep on the cubic schedule of METHODS.md. As in movement pruning, pruned weights get no
gradient of their own (dL/dW = dL/dW' * M): they stay where they were while their score decides
whether they come back. Scores and masks are buffers of the mask parametrization, so checkpoints
carry them and resume needs nothing else.
"""
from __future__ import annotations

import torch

from ..ops import masked, sharded
from .. import models
from ..ops.sparsity import layer_mask
from ..train.distill import make_teacher
from ..train.schedules import cubic
from .base import Method, register


def scores_of(module) -> torch.Tensor:
    return module.parametrizations.weight[0].scores


@register
class MovementPruning(Method):
    names = ("movement",)

    def __init__(self, recipe: dict, tokenizer=None, total_steps: int | None = None):
        super().__init__(recipe, tokenizer)
        self.mv = self.cfg["movement"]
        self.total_steps = total_steps or recipe["train"]["steps"]

    def setup(self, trainer) -> None:
        model = trainer.model
        self.targets = models.find_targets(model, self.cfg["include"], self.cfg["ignore"])
        if self.cfg["distill"]["enabled"] and self.teacher is None:
            self.teacher = make_teacher(model, self.cfg["distill"], trainer.bf16, self.tokenizer)
        for module in self.targets.values():
            weight = masked.dense_weight(module)
            masked.attach_mask(module, torch.ones_like(weight, dtype=torch.bool), ste=True)
            module.parametrizations.weight[0].register_buffer("scores", torch.zeros_like(weight, dtype=torch.float32))

    def keep_fraction(self, step: int) -> float:
        T = self.total_steps
        return cubic(step, T, 1.0, self.cfg["keep"], int(self.mv["start_fraction"] * T), int(self.mv["hold_fraction"] * T))

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        ema = self.mv["ema"]
        for module in self.targets.values():
            weight = masked.dense_weight(module)
            if weight.grad is None:
                continue
            movement = -(weight * weight.grad).float()
            scores = scores_of(module)
            if sharded.is_sharded(weight) and not sharded.is_sharded(scores):
                # first step under FSDP: keep only this rank's rows of the scores, like its weight
                scores = sharded.shard_like(scores, weight).clone()
                module.parametrizations.weight[0].register_buffer("scores", scores)
            if ema:
                scores.mul_(ema).add_(movement, alpha=1 - ema)
            else:
                scores.add_(movement)
            weight.grad.mul_(sharded.shard_like(masked.get_mask(module), weight.grad))

    @torch.no_grad()
    def after_step(self, step: int) -> dict:
        keep = self.keep_fraction(step)
        record = {"keep": keep}
        if step % self.mv["mask_interval"] and step != self.total_steps:
            return record
        # the top-k is over the whole matrix: sharded scores are gathered (once per refresh)
        record["mask_flip_rate"] = masked.refresh_masks(
            self.targets, lambda m: layer_mask(sharded.full(scores_of(m)), 1.0 - keep))
        return record

    def export(self, model) -> dict:
        """Weights M * W with exact zeros (the masks of the last step)."""
        self.targets = {name: model.get_submodule(name) for name in self.targets}  # FSDP: a gathered copy
        for module in self.targets.values():
            masked.bake_mask(module)
        return {"keep": self.cfg["keep"]}

    def card_lines(self, report: dict) -> tuple[str, list[str]]:
        return ("pruned by movement (unstructured)",
                [f"first-order scores, cubic schedule to {self.cfg['keep']:.0%} of target weights kept"])
