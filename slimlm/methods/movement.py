"""First-order pruning (LPAF's first stage, or a method of its own: recipe `movement`).

Every target weight W gets a mask (forward W' = W * M) and a score; the mask keeps the top `keep(t)`
fraction of each matrix (`threshold: matrix`) or of all targets together (`global`) by score.
`movement.score` picks the score (math in ops/first_order.py):

- `learned` (movement pruning as practised, Sanh et al. 2020): S is a parameter trained by AdamW at its
  own learning rate (`score_lr`, 1e-2 in the reference code: 100x the weights') through a
  straight-through top-k, dL/dS = dL/dW' * W. Pruned weights get no gradient; their score can still
  bring them back. S starts at zero (`score_init: zero`, the reference) or at the normalised |W|
  (`magnitude`, for runs too short for the scores to learn a ranking from nothing).
- `sensitivity` (PLATON/PINS, from LPAF's authors): the EMA of |W' * dL/dW'| times its uncertainty
  (EMA of the deviation), or the EMA alone (`uncertainty: false`). Pruned weights score 0 and stay out.
- `magnitude`: |W'| (gradual magnitude pruning, Zhu & Gupta): the control that separates the schedule
  from the criterion.
(Our first version summed the raw signed -W * dL/dW'; on gradient noise that prunes large weights, and
in the issue-16 experiment it collapsed to the majority class where sensitivity kept 89%: removed.)

Schedule, relative to the run (METHODS.md's cubic): keep(t) = 1 until pruning starts, at
max(lr warm-up, start_fraction of the steps), so the weights can adapt before they are cut; falls
cubically to `method.keep` at (1 - hold_fraction) of the steps; then the mask is fixed for the last
`hold_fraction` (fine-tuning under the final mask). Scores and masks live in the mask parametrization
(buffers, or parameters for learned scores), so checkpoints carry them and resume needs nothing else.
"""
from __future__ import annotations

import torch

from ..ops import masked, sharded
from .. import models
from ..errors import SlimlmError
from ..ops.first_order import global_masks, sensitivity_score, update_sensitivity
from ..ops.sparsity import layer_mask
from ..train import budget, distributed
from ..train.distill import make_teacher
from ..train.schedules import cubic
from .base import Method, register


def scores_of(module) -> torch.Tensor:
    """The score state of a target: the learned parameter, or sensitivity's smoothed |W' g|."""
    return module.parametrizations.weight[0].scores


def importance(module, mv: dict) -> torch.Tensor:
    """What the mask ranks this matrix's entries by (stored orientation, whole: gathered under FSDP); LPAF's
    sparsity-aware init weights the kept entries by the same number."""
    parametrization = module.parametrizations.weight[0]
    if mv["score"] == "magnitude":  # derived, never stored: |W'|, pruned entries 0 (they stay out)
        return sharded.full(masked.dense_weight(module).detach()).abs().float() * masked.get_mask(module)
    if mv["score"] == "sensitivity":
        return sharded.full(sensitivity_score(parametrization.scores, parametrization.uncertainty, mv["uncertainty"]))
    return sharded.full(parametrization.scores.detach())


@register
class MovementPruning(Method):
    names = ("movement",)

    def __init__(self, recipe: dict, tokenizer=None, total_steps: int | None = None):
        super().__init__(recipe, tokenizer)
        self.mv = self.cfg["movement"]
        self.total_steps = total_steps or recipe["train"]["steps"]
        T = self.total_steps
        self.start = max(budget.warmup_steps({**recipe["train"], "steps": T}), int(self.mv["start_fraction"] * T))
        self.end = max(self.start, T - int(self.mv["hold_fraction"] * T))  # last step whose refresh counts

    def setup(self, trainer) -> None:
        model = trainer.model
        score = self.mv["score"]
        if score == "learned" and distributed.uses_fsdp(self.recipe["parallel"]):
            raise SlimlmError("method.movement.score=learned is not supported under FSDP (the scores are "
                              "parameters of their own): use method.movement.score=sensitivity, or DDP")
        self.targets = models.find_targets(model, self.cfg["include"], self.cfg["ignore"])
        if self.cfg["distill"]["enabled"] and self.teacher is None:
            self.teacher = make_teacher(model, self.cfg["distill"], trainer.bf16, self.tokenizer)
        for module in self.targets.values():
            weight = masked.dense_weight(module)
            ones = torch.ones_like(weight, dtype=torch.bool)
            zeros = torch.zeros_like(weight, dtype=torch.float32)
            if score == "learned":
                masked.attach_scored_mask(module, ones, self._initial_scores(weight, zeros))
                continue
            masked.attach_mask(module, ones, ste=True)  # every entry's gradient, for its score
            if score == "sensitivity":
                parametrization = module.parametrizations.weight[0]
                parametrization.register_buffer("scores", zeros)
                parametrization.register_buffer("uncertainty", zeros.clone())

    def _initial_scores(self, weight: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """`zero` (the reference): equal scores, the first cut follows only what training taught them.
        `magnitude` (our option): |W| / mean |W| of the matrix, so that a short run, whose scores move by at
        most score_lr per step, starts from magnitude pruning's ranking and moves entries near the
        threshold instead of ranking by a few steps of noise."""
        if self.mv["score_init"] == "zero":
            return zeros
        magnitude = weight.detach().abs().float()
        return magnitude / magnitude.mean().clamp(min=1e-12)

    def configure_optimizer(self, optimizer) -> None:
        """Learned scores: their own AdamW group, no weight decay, at score_lr (following the lr schedule)."""
        if self.mv["score"] != "learned":
            return
        scores = [scores_of(m) for m in self.targets.values()]
        ids = {id(s) for s in scores}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        optimizer.add_param_group({"params": scores, "weight_decay": 0.0,
                                   "lr_scale": self.mv["score_lr"] / self.recipe["train"]["lr"]})

    def keep_fraction(self, step: int) -> float:
        return cubic(step, self.total_steps, 1.0, self.cfg["keep"], self.start, self.total_steps - self.end)

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        score = self.mv["score"]
        if score == "learned":  # the optimizer moves the scores; the forward already masked W's gradient
            return
        for module in self.targets.values():
            weight = masked.dense_weight(module)
            if weight.grad is None:
                continue
            mask = sharded.shard_like(masked.get_mask(module), weight.grad)
            if score == "sensitivity":
                state = module.parametrizations.weight[0]
                if sharded.is_sharded(weight) and not sharded.is_sharded(state.scores):
                    # first step under FSDP: keep only this rank's rows of the score state, like its weight
                    for name in ("scores", "uncertainty"):
                        state.register_buffer(name, sharded.shard_like(getattr(state, name), weight).clone())
                update_sensitivity(state.scores, state.uncertainty, weight * mask, weight.grad,
                                   self.mv["beta1"], self.mv["beta2"])
            weight.grad.mul_(mask)  # pruned weights get no gradient of their own

    @torch.no_grad()
    def after_step(self, step: int) -> dict:
        keep = self.keep_fraction(step)
        record = {"keep": keep}
        # masks change from the start of pruning to its end, then stay fixed; before the start keep is 1
        if step < self.start or step > self.end or (step % self.mv["mask_interval"] and step != self.end):
            return record
        ranking = {name: importance(m, self.mv) for name, m in self.targets.items()}
        if self.mv["threshold"] == "global":
            new = global_masks(ranking, keep)
        else:
            new = {name: layer_mask(r, 1.0 - keep) for name, r in ranking.items()}
        by_module = {self.targets[name]: mask for name, mask in new.items()}
        record["mask_flip_rate"] = masked.refresh_masks(self.targets, by_module.__getitem__)
        return record

    def export(self, model) -> dict:
        """Weights M * W with exact zeros (the masks of the last step)."""
        self.targets = {name: model.get_submodule(name) for name in self.targets}  # FSDP: a gathered copy
        for module in self.targets.values():
            masked.bake_mask(module)
        return {"keep": self.cfg["keep"]}

    def card_lines(self, report: dict) -> tuple[str, list[str]]:
        return (f"pruned by first-order scores ({self.mv['score']}, unstructured)",
                [f"{self.mv['score']} scores, {self.mv['threshold']} threshold, cubic schedule to "
                 f"{self.cfg['keep']:.0%} of target weights kept"])
