"""AdamW with AST's decay of pruned weights, as multi-tensor (foreach) operations.

AST (METHODS.md 2.2) pulls pruned weights to zero with a term d = lambda(t) * (~mask * W). Three ways:
- "decoupled" (our default): W <- W - lr * lambda * (~mask * W), outside Adam's normalisation, like
  AdamW's weight decay restricted to pruned entries. (deviation) The paper puts d inside Adam; there
  the size of its effect depends on the gradients' scale, so no lambda can be chosen for a run in
  advance. Decoupled, the shrink of a pruned weight with no gradient is exactly prod(1 - lr_t lambda_t),
  which train/budget.py turns into a lambda for the run at hand.
- "gradient": d is added to the gradient before the Adam step (enters both moments);
- "second-moment" (the paper's): m <- b1 m + (1-b1) g;  u = m + d;  v <- b2 v + (1-b2) (g + d)^2;
  W <- W - lr * u_hat / (sqrt(v_hat) + eps), with u_hat, v_hat bias-corrected as Adam's moments.
  The decay stays out of the first moment's history but enters the step and the second moment.
  (choice) METHODS.md writes v <- b2 v + (1-b2) u^2 with u = m + d; read literally, v would track m^2
  instead of g^2 and the optimizer would stop being Adam even at lambda = 0. We square the
  gradient plus the decay, so that lambda = 0 is exactly AdamW (tested against torch.optim.AdamW).
Decoupled weight decay (wd * lr * W) is applied as in torch.optim.AdamW, per parameter group (the engine
puts 1-D parameters in a group without it). Every update is a handful of foreach passes over all
tensors of a group; the decay adds one pass (decoupled, gradient) or three (second-moment) over the
masked weights only.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

MODES = ("decoupled", "gradient", "second-moment")


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.kept_masks: dict[torch.Tensor, Callable[[], torch.Tensor]] = {}
        self.decay_mode = "decoupled"
        self.decay_strength: Callable[[], float] = lambda: 0.0

    def set_decay(self, masks: dict[torch.Tensor, Callable[[], torch.Tensor]], strength: Callable[[], float],
                  mode: str) -> None:
        """Decay the entries of each parameter outside its mask (`masks[param]()`: a bool tensor shaped
        like the parameter, True = kept) with lambda = `strength()`, read at every step."""
        if mode not in MODES:
            raise ValueError(f"unknown decay mode {mode!r}")
        self.kept_masks, self.decay_strength, self.decay_mode = dict(masks), strength, mode

    @torch.no_grad()
    def step(self, closure=None):
        lam = self.decay_strength() if self.kept_masks else 0.0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params, lam)
        return None

    def _update(self, group: dict, params: list[torch.Tensor], lam: float) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for p in params:
            if not self.state[p]:
                self.state[p] = {"step": torch.zeros((), dtype=torch.float64),
                                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            self.state[p]["step"] += 1
        t = self.state[params[0]]["step"].item()
        grads = [p.grad for p in params]
        exp_avg = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in params]
        # the masked parameters of this group and their pruned entries (~mask)
        at = [i for i, p in enumerate(params) if p in self.kept_masks] if lam else []
        masked = [params[i] for i in at]
        pruned = [~self.kept_masks[p]() for p in masked]
        numerator, squared = exp_avg, grads
        if at and self.decay_mode == "gradient":  # g <- g + lambda * (~m * W): both moments see it
            grads = list(grads)
            for i, g in zip(at, torch._foreach_addcmul([grads[i] for i in at], masked, pruned, value=lam)):
                grads[i] = g
            squared = grads
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        if at and self.decay_mode == "second-moment":  # u = m + d and (g + d)^2, m itself without d
            d = torch._foreach_mul(masked, pruned)
            torch._foreach_mul_(d, lam)
            numerator, squared = list(exp_avg), list(grads)
            for i, u, gd in zip(at, torch._foreach_add([exp_avg[i] for i in at], d),
                                torch._foreach_add([grads[i] for i in at], d)):
                numerator[i], squared[i] = u, gd
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, squared, squared, value=1 - beta2)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        if at and self.decay_mode == "decoupled":  # W <- W - lr * lambda * (~m * W)
            torch._foreach_addcmul_(masked, masked, pruned, value=-lr * lam)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, math.sqrt(1 - beta2**t))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, numerator, denom, value=-lr / (1 - beta1**t))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices (and higher) with weight decay, 1-D parameters
    (norms, biases) without, as nanoGPT and most LM trainers do. Model order is kept within a group."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
