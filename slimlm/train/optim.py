"""AdamW with an optional per-parameter extra term, for AST's SR-STE decay.

AST (METHODS.md 2.2) pulls pruned weights to zero with a term d = lambda(t) * (~mask * W). Two ways:
- "gradient": d is added to the gradient before a stock AdamW step (enters both moments);
- "second-moment" (the paper's): m <- b1 m + (1-b1) g;  u = m + d;  v <- b2 v + (1-b2) (g + d)^2;
  W <- W - lr * u_hat / (sqrt(v_hat) + eps), with u_hat, v_hat bias-corrected as Adam's moments.
  The decay stays out of the first moment's history but enters the step and the second moment.
  (choice) METHODS.md writes v <- b2 v + (1-b2) u^2 with u = m + d; read literally, v would track m^2
  instead of g^2 and the optimizer would stop being Adam even at lambda = 0. We square the
  gradient plus the decay, so that lambda = 0 is exactly AdamW (tested against torch.optim.AdamW).
Decoupled weight decay (wd * lr * W) is applied as in torch.optim.AdamW.
"""
from __future__ import annotations

from typing import Callable

import torch


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.extra_terms: dict[torch.Tensor, tuple[Callable[[], torch.Tensor | None], str]] = {}

    def set_extra_term(self, param: torch.Tensor, term: Callable[[], torch.Tensor | None], mode: str) -> None:
        if mode not in ("gradient", "second-moment"):
            raise ValueError(f"unknown extra-term mode {mode!r}")
        self.extra_terms[param] = (term, mode)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                term, mode = self.extra_terms.get(p, (None, None))
                extra = term() if term is not None else None
                if extra is not None and mode == "gradient":
                    grad = grad + extra
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                if extra is not None and mode == "second-moment":
                    u, g2 = m + extra, grad + extra
                else:
                    u, g2 = m, grad
                v.mul_(beta2).addcmul_(g2, g2, value=1 - beta2)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                p.addcdiv_(u, denom, value=-group["lr"] / (1 - beta1**t))
        return None
