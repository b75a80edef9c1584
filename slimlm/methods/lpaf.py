"""LPAF: movement pruning (methods/movement.py), then factorize each target matrix (plain, Fisher-weighted
or sparsity-aware SVD), then mixed-rank fine-tuning, then export as low-rank (or merged dense) layers.
The `LPAF` method runs the two stages as two engine runs.

Mixed-rank fine-tuning (METHODS.md, our choice): for the first `mixed_fraction` of the fine-tuning
steps each layer runs its low-rank factors with probability p(t), rising linearly to 1, and its
sparse matrix otherwise, so the network moves from sparse to low-rank gradually; afterwards only
the factors run. The alternative (`mixed: rank`) always runs the factors but samples a rank
r' in [p(t) r, r] per layer and step. The random draws are a pure function of (seed, step), so a
resumed run draws what the uninterrupted run drew.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

from ..ops import masked
from .. import models
from ..errors import SlimlmError
from ..ops.factorized import LowRankLinear, MixedRankLinear, linear_view, replace_module
from ..ops.lowrank import factorize, rank_for_budget
from ..train import budget
from ..train.datasets import as_dataset, sample_batches
from ..train.distill import distill_loss, make_teacher
from ..train.engine import Trainer
from .base import Method, RunContext, register
from ..prune.blockwise import InputStats
from .movement import MovementPruning, importance


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
def input_grams(model, targets: dict, batches: list[dict]) -> dict[str, torch.Tensor]:
    """X X^T of each target's inputs over the batches' tokens (in x in), accumulated by the calibration
    statistics one-shot pruning uses (SparseGPT's Hessian before its scaling): the second moments the
    `activation` factorization fits the layer's output on. Padding positions are left out."""
    device = next(model.parameters()).device
    stats = {name: InputStats(linear_view(m)[0].shape[1], hessian=True, device=device) for name, m in targets.items()}
    batch_positions: dict[str, torch.Tensor] = {}  # the current batch's non-padding tokens

    def record(stat: InputStats):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            positions = batch_positions.get("kept")
            stat.add(x[positions] if positions is not None and positions.numel() == x.shape[0] else x)
        return hook

    handles = [m.register_forward_pre_hook(record(stats[name])) for name, m in targets.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            attention = batch.get("attention_mask")
            batch_positions["kept"] = attention.reshape(-1).bool() if attention is not None else None
            model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {name: s.xtx for name, s in stats.items()}


@torch.no_grad()
def factorize_targets(model, targets: dict, keep: float, method: str, iters: int,
                      fisher: dict | None = None, pruned_weight: float = 0.0,
                      grams: dict | None = None, scores: dict | None = None) -> dict[str, MixedRankLinear]:
    """Replace every target by a MixedRankLinear holding its (masked) weight and rank-r factors, with
    r from the parameter budget `keep`. A target pruned in stage 1 brings its mask; `scores`: {name: the
    importance its mask was chosen by}, for the sparsity-aware init."""
    layers = {}
    for name, module in targets.items():
        weight, bias = linear_view(module)  # masked weight when a mask is attached
        if masked.is_masked(module):
            mask = masked.as_out_in(module, masked.get_mask(module))
        else:
            mask = torch.ones_like(weight, dtype=torch.bool)
        rank = rank_for_budget(weight.shape[0], weight.shape[1], keep)
        A, B = factorize(method, weight, rank, mask=mask, scores=scores.get(name) if scores else None,
                         fisher=fisher[name] if fisher else None, iters=iters, pruned_weight=pruned_weight,
                         gram=grams[name] if grams else None)
        layer = MixedRankLinear(weight, mask, bias, LowRankLinear.from_factors(A, B, None))
        layer.original_type = type(module)  # what a merged export writes back
        replace_module(model, name, layer)
        layers[name] = layer
    return layers


class MixedRankTraining(Method):
    """LPAF's second stage (not a recipe of its own): the hooks of mixed-rank fine-tuning."""

    def __init__(self, recipe: dict, layers: dict[str, MixedRankLinear], teacher, total_steps: int):
        super().__init__(recipe)
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


@register
class LPAF(Method):
    """Stage 1: movement pruning (or none); stage 2: factorize, then mixed-rank fine-tuning. Each stage is
    an engine run with its own checkpoints (run_dir/prune, run_dir/finetune) and schedules; the teacher is
    made once, from the starting model, for both."""
    names = ("lpaf",)

    def __init__(self, recipe: dict, tokenizer=None):
        super().__init__(recipe, tokenizer)
        lp = self.cfg["lpaf"]
        if lp["prune"] == "none" and lp["factorization"] == "sparsity-aware":
            raise SlimlmError("method.lpaf.factorization=sparsity-aware needs pruning scores: set "
                              "method.lpaf.prune=movement or choose svd or fisher")
        self.finetuning: MixedRankTraining | None = None

    def run(self, ctx: RunContext) -> list[Trainer]:
        recipe, model = ctx.recipe, ctx.model
        resume_stage = Path(ctx.resume).parent.name if ctx.resume else None
        bf16 = budget.use_bf16(recipe["train"]["bf16"], next(model.parameters()).device)
        self.teacher = make_teacher(model, self.cfg["distill"], bf16, self.tokenizer) if self.cfg["distill"]["enabled"] else None
        first, model, targets = lpaf_prune_stage(model, recipe, self.teacher, ctx.train, ctx.valid, ctx.run_dir,
                                                 ctx.resume, finished=resume_stage == "finetune")
        second, self.finetuning = lpaf_lowrank_stage(model, recipe, self.teacher, targets, ctx.train, ctx.valid,
                                                     ctx.run_dir, ctx.resume if resume_stage == "finetune" else None)
        return [t for t in (first, second) if t is not None]

    def export(self, model) -> dict:
        return {**self.finetuning.export(model), "keep": self.cfg["keep"]}

    def target_names(self) -> list[str]:
        return list(self.finetuning.layers)

    def card_lines(self, report: dict) -> tuple[str, list[str]]:
        lp = self.cfg["lpaf"]
        return (f"factorized to {self.cfg['keep']:.0%} of the target-layer parameters (LPAF)",
                [f"pruning: {lp['prune']}", f"factorization: {lp['factorization']} SVD", f"mixed-rank fine-tuning: {lp['mixed']}"])

    def card_notes(self, report: dict) -> list[str]:
        return ["Factorized layers: ranks in `config.json` under `slimlm_lowrank`."] if report.get("lowrank_ranks") else []

    def slimlm_only(self, report: dict) -> bool:
        return bool(report.get("lowrank_ranks"))  # factorized layers transformers cannot build


def lpaf_steps(recipe: dict) -> tuple[int, int]:
    """(pruning steps, fine-tuning steps) of an LPAF run."""
    lp, total = recipe["method"]["lpaf"], recipe["train"]["steps"]
    prune = int(lp["prune_fraction"] * total) if lp["prune"] == "movement" else 0
    return prune, total - prune


def lpaf_prune_stage(model, recipe: dict, teacher, train, valid, run_dir: Path, resume: str | None = None,
                     finished: bool = False):
    """Movement pruning to method.keep (or nothing when lpaf.prune=none). Returns (trainer or None,
    the model as a plain module, its target layers, masked and scored). `finished`: restore the stage's
    last checkpoint instead of training."""
    steps, _ = lpaf_steps(recipe)
    if not steps:
        return None, model, models.find_targets(model, recipe["method"]["include"], recipe["method"]["ignore"])
    stage = _stage_recipe(recipe, steps)
    pruning = MovementPruning(stage, total_steps=steps)
    pruning.teacher = teacher
    trainer = Trainer(model, pruning, stage, train, valid, run_dir / "prune")
    last = run_dir / "prune" / f"checkpoint-{steps}"
    if finished:
        trainer.load_checkpoint(str(last))
    else:
        if resume:
            trainer.load_checkpoint(resume)
        trainer.train()
        if not last.exists():
            trainer.save_checkpoint()  # stage 2 resumes from here
    # factorizing changes the model: drop stage 1's DDP wrapper (its gradient hooks), or under FSDP
    # gather the shards into a plain copy on every rank (each factorizes the same weights identically)
    model = trainer.unsharded_model(everywhere=True)
    # stage 2 needs neither stage 1's optimizer moments nor (FSDP) its shards: let them go
    trainer.model = trainer.forward_model = model
    trainer.optimizer = None
    return trainer, model, {name: model.get_submodule(name) for name in pruning.targets}


def lpaf_lowrank_stage(model, recipe: dict, teacher, targets: dict, train, valid, run_dir: Path,
                       resume: str | None = None):
    """Factorize the targets at the parameter budget, then mixed-rank fine-tuning. Returns (trainer, hooks)."""
    layers = lpaf_factorize(model, recipe, targets, train)
    return lpaf_finetune(model, recipe, teacher, layers, train, valid, run_dir, resume)


def lpaf_factorize(model, recipe: dict, targets: dict, train) -> dict:
    """Replace the targets by mixed-rank layers initialised by the recipe's factorization."""
    lp = recipe["method"]["lpaf"]
    fisher = grams = None
    if lp["factorization"] in ("fisher", "activation"):  # statistics on seeded training batches
        batches = sample_batches(as_dataset(train, recipe["data"]["seqlen"]), lp["calib_batches"],
                                 recipe["train"]["batch_size"], recipe["seed"], next(model.parameters()).device)
        if lp["factorization"] == "fisher":  # squared gradients of the task loss
            fisher = fisher_information(model, targets, batches,
                                        lambda m, b: distill_loss(m, None, b, recipe["method"]["distill"]))
        else:  # the inputs each layer sees in the (pruned) model
            grams = input_grams(model, targets, batches)
    scores = None
    if lp["factorization"] == "sparsity-aware":  # what stage 1 ranked the weights by
        scores = {name: masked.as_out_in(m, importance(m, recipe["method"]["movement"]))
                  for name, m in targets.items() if masked.is_masked(m)}
    return factorize_targets(model, targets, recipe["method"]["keep"], lp["factorization"], lp["svd_iters"], fisher,
                             lp["pruned_weight"], grams, scores)


def lpaf_finetune(model, recipe: dict, teacher, layers: dict, train, valid, run_dir: Path, resume: str | None = None):
    _, steps = lpaf_steps(recipe)
    stage = _stage_recipe(recipe, steps)
    hooks = MixedRankTraining(stage, layers, teacher, steps)
    trainer = Trainer(model, hooks, stage, train, valid, run_dir / "finetune")
    if resume:
        trainer.load_checkpoint(resume)
    trainer.train()
    return trainer, hooks


def _stage_recipe(recipe: dict, steps: int) -> dict:
    stage = copy.deepcopy(recipe)
    stage["train"]["steps"] = steps
    if stage["train"]["warmup_steps"] != "auto":  # auto is already a fraction of the stage
        stage["train"]["warmup_steps"] = min(stage["train"]["warmup_steps"], max(0, steps - 1))
    return stage
