"""Pure tensor math for first-order pruning scores (movement pruning's learned scores and the
sensitivity family of PLATON / PINS) and for turning scores into masks.

- learned scores (Sanh et al. 2020): S is a parameter trained by the optimizer. The forward uses
  W' = W * TopK(S); the backward is straight-through for S: dL/dS = dL/dW' * W, and W gets dL/dW' * M
  (pruned weights get no gradient of their own). `masked_by_scores` is that product.
- sensitivity (Zhang et al. 2022, PLATON): I = |W * dL/dW|, the first-order estimate of the loss change
  when W is removed; smoothed I_bar <- b1 I_bar + (1 - b1) I, with an uncertainty term
  U <- b2 U + (1 - b2) |I - I_bar|; the score is I_bar * U (or I_bar alone without the uncertainty
  term). Absolute, so gradient noise cannot make a large weight look removable the way a signed
  sum -W * g does.
"""
from __future__ import annotations

import torch


class _MaskedByScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, scores, mask):
        ctx.save_for_backward(weight, mask)
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        weight, mask = ctx.saved_tensors
        # W: only kept entries learn; S: straight through the top-k, dL/dS = dL/dW' * W
        return grad * mask, (grad * weight).to(torch.float32), None


def masked_by_scores(weight: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W * mask, with gradient dL/dW' * mask to W and dL/dW' * W to `scores` (mask = TopK(scores))."""
    return _MaskedByScores.apply(weight, scores, mask)


def update_sensitivity(average: torch.Tensor, uncertainty: torch.Tensor, weight: torch.Tensor,
                       grad: torch.Tensor, beta1: float, beta2: float) -> None:
    """One step of PLATON's smoothed sensitivity, in place: I = |W * g|; I_bar and U as above."""
    importance = (weight.float() * grad.float()).abs()
    average.mul_(beta1).add_(importance, alpha=1 - beta1)
    uncertainty.mul_(beta2).add_((importance - average).abs(), alpha=1 - beta2)


def sensitivity_score(average: torch.Tensor, uncertainty: torch.Tensor, use_uncertainty: bool) -> torch.Tensor:
    return average * uncertainty if use_uncertainty else average


def global_masks(scores: dict[str, torch.Tensor], keep: float) -> dict[str, torch.Tensor]:
    """Keep the `keep` fraction of all entries of all matrices together, by score (one threshold for the
    whole model: layers whose scores are larger keep more). Exactly round(keep * total) entries kept,
    ties broken by position."""
    flat = torch.cat([s.detach().float().flatten() for s in scores.values()])
    kept = torch.zeros_like(flat, dtype=torch.bool)
    n_keep = int(round(keep * flat.numel()))
    if n_keep:
        kept[flat.topk(n_keep).indices] = True
    masks, at = {}, 0
    for name, s in scores.items():
        masks[name] = kept[at:at + s.numel()].reshape(s.shape)
        at += s.numel()
    return masks
