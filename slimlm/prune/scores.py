"""Pruning scores and the one-shot rules that use them (pure tensor math).

- magnitude: |W|; N:M per group, unstructured over the whole layer (as in the Wanda reference code).
- Wanda (Sun et al., 2023): |W_ij| * ||X_j||_2, compared per output row (or per N:M group).
"""
from __future__ import annotations

import torch

from ..ops.sparsity import Sparsity, mask_from_scores


def magnitude_mask(weight: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    return mask_from_scores(weight.detach().abs(), sparsity, group="layer")


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """input_sq_norms[j] = sum over calibration tokens of x_j^2."""
    return weight.detach().abs().float() * input_sq_norms.float().sqrt().reshape(1, -1)


def wanda_mask(weight: torch.Tensor, input_sq_norms: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    return mask_from_scores(wanda_scores(weight, input_sq_norms), sparsity, group="row")
