"""N:M sparse training as engine hooks: AST and its baselines (naive fixed mask, gradual magnitude).

- masks: dense master weights, masked forward (masked.py); AST refreshes the magnitude N:M mask
  every `mask_interval` steps and logs the fraction of entries that flip.
- decay: lambda(t) * (~mask * W), ramped linearly over `ramp_fraction` of training, through the
  optimizer (in Adam's second moment, or added to the gradient).
- distillation from the frozen dense teacher; SLoRB side paths.
"""
from __future__ import annotations

import torch

from .. import masked, models, sharded, slorb
from ..data import calibration_windows, load_tokens
from ..prune import prune
from ..errors import SlimlmError
from ..sparsity import parse_sparsity
from .distill import distill_loss, make_teacher
from .engine import Hooks
from .schedules import cubic, linear_ramp


class SparseTraining(Hooks):
    def __init__(self, recipe: dict, tokenizer):
        self.recipe, self.cfg = recipe, recipe["method"]
        self.sparsity = parse_sparsity(self.cfg["sparsity"])
        if not self.sparsity.is_nm:
            raise SlimlmError(f"method.sparsity must be N:M for sparse training, got '{self.cfg['sparsity']}'")
        self.tokenizer = tokenizer
        self.total_steps = recipe["train"]["steps"]
        self.lam = 0.0
        self.teacher = None
        self.targets: dict = {}
        self.slorbs: dict = {}

    # -- setup -------------------------------------------------------------------------------------
    def setup(self, trainer) -> None:
        model, cfg, sp = trainer.model, self.cfg, self.sparsity
        targets = models.find_targets(model, cfg["include"], cfg["ignore"])
        self.targets, _ = models.target_layers(model, targets, sp.m, skip_indivisible=False)
        if cfg["distill"]["enabled"]:
            self.teacher = make_teacher(model, cfg["distill"])
        # SLoRB starts from what the mask removes from the *dense* weights, so keep them before a
        # one-shot pruner zeroes the pruned entries
        one_shot = cfg["init"] in ("wanda", "sparsegpt")
        dense = ({n: m.weight.detach().clone() for n, m in self.targets.items()}
                 if cfg["slorb"]["enabled"] and one_shot else {})
        if one_shot:  # one-shot mask (SparseGPT also updates kept weights)
            calib = load_tokens(self.tokenizer, cfg["calib"] or self.recipe["data"]["train"])
            windows = calibration_windows(calib, cfg["nsamples"], self.recipe["data"]["seqlen"], self.recipe["seed"])
            prune(model, self.targets, cfg["init"], sp, windows)
        for name, module in self.targets.items():
            keep = sp.m if cfg["mask_update"] == "gradual" else sp.n
            mask = masked.magnitude_nm_mask(module, sp.n, sp.m, keep_per_group=keep)
            if cfg["slorb"]["enabled"]:
                self._add_slorb(name, module, mask, dense.pop(name, module.weight.detach()))
            masked.attach_mask(module, mask, ste=cfg["ste"])

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
        mode = self.cfg["decay"]["mode"]
        if mode == "none":
            return
        for module in self.targets.values():
            weight = masked.dense_weight(module)
            mask = masked.get_mask(module)
            # a sharded weight meets the rows of the (full) mask that its rank holds
            optimizer.set_extra_term(weight, lambda w=weight, m=mask: self.lam * (w * ~sharded.shard_like(m, w))
                                     if self.lam else None, mode)

    # -- per step ----------------------------------------------------------------------------------
    def before_forward(self, step: int) -> None:
        d = self.cfg["decay"]
        self.lam = linear_ramp(step, int(d["ramp_fraction"] * self.total_steps), d["lambda_max"])

    def loss(self, model, batch):
        return distill_loss(model, self.teacher, batch, self.cfg["distill"])

    def after_step(self, step: int) -> dict:
        cfg = self.cfg
        record = {"lambda": self.lam}
        if cfg["mask_update"] == "fixed" or step % cfg["mask_interval"]:
            return record
        sp = self.sparsity
        if cfg["mask_update"] == "gradual":
            # prune p of every M, p rising 0 -> M-N on a cubic schedule; masks from the *masked*
            # weights, so that what was pruned stays pruned
            ramp = int(cfg["gradual_fraction"] * self.total_steps)
            pruned = round(cubic(step, self.total_steps, 0.0, sp.m - sp.n, 0, self.total_steps - ramp))
            record["pruned_per_group"] = pruned
        if cfg["mask_update"] == "adaptive":
            record["mask_flip_rate"] = masked.refresh_masks(self.targets, lambda m: masked.magnitude_nm_mask(m, sp.n, sp.m))
        else:
            record["mask_flip_rate"] = masked.refresh_masks(self.targets, lambda m: _masked_magnitude_mask(m, sp.m - pruned, sp.m))
        return record

    # -- export ------------------------------------------------------------------------------------
    def export(self, model) -> dict:
        """Final mask = magnitude N:M mask of the final weights (adaptive), weights m * W with exact zeros."""
        sp = self.sparsity
        self.targets = {name: model.get_submodule(name) for name in self.targets}  # FSDP: a gathered copy
        self.slorbs = {name: self.targets[name].slorb for name in self.slorbs}
        for module in self.targets.values():
            if self.cfg["mask_update"] == "adaptive":
                masked.set_mask(module, masked.magnitude_nm_mask(module, sp.n, sp.m))
            elif self.cfg["mask_update"] == "gradual":
                masked.set_mask(module, _masked_magnitude_mask(module, sp.n, sp.m))
            masked.bake_mask(module)
        return {"slorb_layers": len(self.slorbs),
                "slorb_parameters": sum(p.numel() for s in self.slorbs.values() for p in s.parameters())}


def _masked_magnitude_mask(module, keep: int, m: int):
    """N:M mask from the *masked* weights (GMP): what was pruned stays pruned."""
    weight = masked.dense_weight(module).detach()
    effective = weight * sharded.shard_like(masked.get_mask(module), weight)
    return masked.magnitude_nm_mask(module, keep, m, weight=effective)
