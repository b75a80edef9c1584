"""N:M sparse training: AST and its baselines (naive fixed mask, gradual magnitude), one method object
serving the recipe names `ast`, `naive` and `gmp` (their recipes differ only in settings).

- masks: dense master weights, masked forward (masked.py). The first mask is the magnitude mask or a
  one-shot method's (wanda, sparsegpt); a one-shot start leaves the dense weights in place
  (init_pruned=dense), so that pruned weights can come back. AST refreshes the mask every Delta-t steps
  from a score (magnitude, or Wanda's |W|*||x|| with input norms gathered once from calibration), with
  ties and near-ties kept by the incumbent (mask_margin); no refresh in the last Delta-t steps, so the
  published mask is the one the model was trained with. Each refresh logs the fraction of mask
  entries that flip.
- decay: lambda(t) * (~mask * W), ramped linearly over `ramp_fraction` of training, through the
  optimizer (decoupled, in Adam's second moment, or added to the gradient); lambda_max 'auto' is
  derived from the run (train/budget.py). Refreshes log the integrated decay and the size of the
  pruned weights relative to the start.
- distillation from the frozen dense teacher; SLoRB side paths.
"""
from __future__ import annotations

import torch

from ..ops import masked, sharded, slorb
from .. import models
from ..data import calibration_windows, load_tokens, options
from ..errors import SlimlmError
from ..eval.layers import layer_stats, totals
from ..prune import calibration_input_norms, prune
from ..ops.sparsity import parse_sparsity
from ..train import budget
from ..train.distill import make_teacher
from ..train.schedules import cubic, linear_ramp
from .base import Method, register

ONE_SHOT = ("wanda", "sparsegpt")


@register
class SparseTraining(Method):
    names = ("ast", "naive", "gmp")
    kinds = ("causal-lm",)

    def __init__(self, recipe: dict, tokenizer):
        super().__init__(recipe, tokenizer)
        self.sparsity = parse_sparsity(self.cfg["sparsity"])
        if not self.sparsity.is_nm:
            raise SlimlmError(f"method.sparsity must be N:M for sparse training, got '{self.cfg['sparsity']}'")
        decay = self.cfg["decay"]
        if decay["lambda_max"] == "auto" and decay["mode"] not in ("decoupled", "none"):
            raise SlimlmError(f"method.decay.lambda_max=auto needs method.decay.mode=decoupled (in Adam's moments the "
                              f"decay's effect depends on the gradients' scale): set a number for mode {decay['mode']}")
        budget.check_sparse_schedule(recipe)
        self.total_steps = recipe["train"]["steps"]
        self.lambda_max = budget.lambda_max(recipe) if decay["mode"] != "none" else 0.0
        self.decay_rates = budget.decay_rates(recipe["train"], decay)  # lr_t * ramp_t, for the logged integral
        self.score = self.cfg["mask_score"]
        if self.score == "auto":
            self.score = "activation" if self.cfg["init"] in ONE_SHOT else "magnitude"
        self.lam = 0.0
        self.slorbs: dict = {}
        self.input_scale: dict = {}  # ||x_j|| per target layer, for the activation-aware score
        self.pruned_rms0 = None

    # -- setup -------------------------------------------------------------------------------------
    def setup(self, trainer) -> None:
        model, cfg, sp = trainer.model, self.cfg, self.sparsity
        targets = models.find_targets(model, cfg["include"], cfg["ignore"])
        self.targets, _ = models.target_layers(model, targets, sp.m, skip_indivisible=False)
        if cfg["distill"]["enabled"]:
            self.teacher = make_teacher(model, cfg["distill"], trainer.bf16, self.tokenizer)
        # a one-shot prune zeroes the pruned weights: keep them if they are restored or feed SLoRB's init
        keep_dense = cfg["init"] in ONE_SHOT and (cfg["init_pruned"] == "dense" or cfg["slorb"]["enabled"])
        dense = {n: m.weight.detach().clone() for n, m in self.targets.items()} if keep_dense else {}
        if cfg["init"] in ONE_SHOT or self.score == "activation":
            calib = load_tokens(self.tokenizer, cfg["calib"] or self.recipe["data"]["train"], split="train",
                                **options(self.recipe["data"]))  # the calibration protocol: text joined by blank lines
            windows = calibration_windows(calib, cfg["nsamples"], self.recipe["data"]["seqlen"], self.recipe["seed"])
            if cfg["init"] in ONE_SHOT:  # the one-shot mask (SparseGPT also updates the kept weights)
                prune(model, self.targets, cfg["init"], sp, windows, input_norms=self.input_scale)
            else:
                self.input_scale = calibration_input_norms(model, self.targets, windows)
        if self.score != "activation":
            self.input_scale = {}
        for name, module in self.targets.items():
            keep = sp.m if cfg["mask_update"] == "gradual" else sp.n
            # after a one-shot prune the kept weights are its non-zeros (ties among exact zeros: lowest index)
            mask = masked.magnitude_nm_mask(module, sp.n, sp.m, keep_per_group=keep)
            if name in dense and cfg["init_pruned"] == "dense":
                # pruned weights start from their dense values (SparseGPT's kept weights keep its update):
                # the mask is the one-shot method's, and a refresh can still bring a pruned weight back
                module.weight.data.copy_(torch.where(mask, module.weight.detach(), dense[name]))
            if cfg["slorb"]["enabled"]:
                self._add_slorb(name, module, mask, dense.pop(name, module.weight.detach()))
            masked.attach_mask(module, mask, ste=cfg["ste"])
        self.pruned_rms0 = self._pruned_rms()

    def _add_slorb(self, name, module, mask, dense_weight) -> None:
        k = self.cfg["slorb"]["group_size"]
        W = masked.as_out_in(module, dense_weight)
        path = slorb.SLoRB(W.shape[0], W.shape[1], k, self.cfg["slorb"]["train_x"]).to(W.device, W.dtype)
        if self.cfg["slorb"]["init"] == "mean":
            path.S.data.copy_(slorb.mean_init(W, masked.as_out_in(module, mask), k))
        else:
            torch.nn.init.normal_(path.S, std=W.shape[1] ** -0.5)
        slorb.attach(module, path)
        self.slorbs[name] = path

    def configure_optimizer(self, optimizer) -> None:
        if self.cfg["decay"]["mode"] == "none":
            return
        masks = {}
        for module in self.targets.values():
            weight, mask = masked.dense_weight(module), masked.get_mask(module)
            # a sharded weight meets the rows of the (full) mask that its rank holds
            masks[weight] = lambda w=weight, m=mask: sharded.shard_like(m, w)
        optimizer.set_decay(masks, lambda: self.lam, self.cfg["decay"]["mode"])

    # -- per step ----------------------------------------------------------------------------------
    def before_forward(self, step: int) -> None:
        ramp = budget.ramp_steps(self.cfg["decay"], self.total_steps)
        self.lam = linear_ramp(step, ramp, self.lambda_max)

    def after_step(self, step: int) -> dict:
        cfg = self.cfg
        record = {"lambda": self.lam}
        if cfg["mask_update"] == "fixed" or not budget.refreshes_at(cfg, self.total_steps, step):
            if step == self.total_steps:
                record.update(self._decay_record(step))
            return record
        sp = self.sparsity
        if cfg["mask_update"] == "gradual":
            # prune p of every M, p rising 0 -> M-N on a cubic schedule; masks from the *masked*
            # weights, so that what was pruned stays pruned
            ramp = int(cfg["gradual_fraction"] * self.total_steps)
            pruned = round(cubic(step, self.total_steps, 0.0, sp.m - sp.n, 0, self.total_steps - ramp))
            record["pruned_per_group"] = pruned
            record["mask_flip_rate"] = masked.refresh_masks(self.targets, lambda m: _masked_magnitude_mask(m, sp.m - pruned, sp.m))
        else:
            record["mask_flip_rate"] = self.refresh()
        record.update(self._decay_record(step))
        return record

    def refresh(self) -> float:
        """AST's refresh: every mask recomputed from the training score (with hysteresis against the current
        mask). Returns the fraction of mask entries that flipped."""
        scale = {module: self.input_scale.get(name) for name, module in self.targets.items()}
        n, m, margin = self.sparsity.n, self.sparsity.m, self.cfg["mask_margin"]
        return masked.refresh_masks(self.targets, lambda module: masked.score_nm_mask(
            module, n, m, input_scale=scale[module], margin=margin))

    def _pruned_rms(self) -> float:
        """Root mean square of the weights outside the masks, over every target layer."""
        total = count = 0.0
        for module in self.targets.values():
            weight, mask = masked.dense_weight(module).detach(), masked.get_mask(module)
            total += float(sharded.full((weight * ~sharded.shard_like(mask, weight)).float().square().sum()))
            count += float((~mask).sum())
        return (total / count) ** 0.5 if count else 0.0

    def _decay_record(self, step: int) -> dict:
        """The pruned weights' size relative to the start (what the decay and the gradients achieved) and,
        with a decay, the decay integrated so far (sum of lr_t * lambda_t: the log-shrink of a pruned
        weight without gradient)."""
        rms = self._pruned_rms()
        record = {"pruned_rms": rms, "pruned_rms_ratio": rms / self.pruned_rms0 if self.pruned_rms0 else None}
        if self.cfg["decay"]["mode"] != "none":
            record["decay_integral"] = budget.decay_integral(self.decay_rates, self.lambda_max, step)
        return record

    # -- export ------------------------------------------------------------------------------------
    def export(self, model) -> dict:
        """The mask the model was trained with (no refresh after the last Delta-t steps; gradual: its last
        N:M mask), weights m * W with exact zeros."""
        sp = self.sparsity
        self.targets = {name: model.get_submodule(name) for name in self.targets}  # FSDP: a gathered copy
        self.slorbs = {name: self.targets[name].slorb for name in self.slorbs}
        for module in self.targets.values():
            if self.cfg["mask_update"] == "gradual":
                masked.set_mask(module, _masked_magnitude_mask(module, sp.n, sp.m))
            masked.bake_mask(module)
        return {"slorb_layers": len(self.slorbs),
                "slorb_parameters": sum(p.numel() for s in self.slorbs.values() for p in s.parameters()),
                "lambda_max": self.lambda_max, "mask_interval": budget.mask_interval(self.cfg, self.total_steps),
                "mask_score": self.score}

    # -- report and card ---------------------------------------------------------------------------
    def report_fields(self, model, extras: dict) -> dict:
        return {"sparsity": self.cfg["sparsity"], "totals": totals(model, self.targets),
                "layers": layer_stats(self.targets, ranks=False)}

    def card_lines(self, report: dict) -> tuple[str, list[str]]:
        m = self.cfg
        if m["mask_update"] == "fixed":
            parts = [f"masks: fixed ({m['init']})"]
        else:
            parts = [f"masks: {m['mask_update']} (first mask: {m['init']}; refreshed every {report['mask_interval']} "
                     f"steps by {report['mask_score']} score, none in the last interval)"]
        if m["decay"]["mode"] != "none":
            parts.append(f"SR-STE decay λ_max={report['lambda_max']:.4g} ({m['decay']['mode']}"
                         + (f", solved for a {m['decay']['target_shrink']:.0%} shrink of pruned weights"
                            if m["decay"]["lambda_max"] == "auto" else "") + ")")
        return f"retrained to **{report['sparsity']}** sparsity", parts

    def card_notes(self, report: dict) -> list[str]:
        if not report.get("slorb_layers"):
            return []
        return [f"SLoRB side paths in {report['slorb_layers']} layers ({report['slorb_parameters']:,} parameters, "
                f"group size {self.cfg['slorb']['group_size']}) are stored in `slorb.safetensors`."]

    def slimlm_only(self, report: dict) -> bool:
        return bool(report.get("slorb_layers"))  # the side paths live beside the checkpoint


def _masked_magnitude_mask(module, keep: int, m: int):
    """N:M mask from the *masked* weights (GMP): what was pruned stays pruned."""
    weight = masked.dense_weight(module).detach()
    effective = weight * sharded.shard_like(masked.get_mask(module), weight)
    return masked.magnitude_nm_mask(module, keep, m, weight=effective)
