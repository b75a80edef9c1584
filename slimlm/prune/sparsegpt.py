"""SparseGPT (Frantar & Alistarh, 2023): prune one layer with the OBS update, column block by column block.

Pure tensor math: takes W (out, in) and the layer Hessian H = 2/n * sum x x^T (in, in); returns the
pruned and updated weight. Follows the published algorithm: dampening by a fraction of the mean
diagonal, Cholesky of the inverse Hessian, the mask chosen lazily per block of columns (for N:M,
per group of M columns inside the block) by w^2 / [H^-1]_jj^2, and the error of each pruned column
spread over the not-yet-processed columns.
"""
from __future__ import annotations

import torch

from ..ops.sparsity import Sparsity


def inverse_hessian_cholesky(hessian: torch.Tensor, weight: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1. Dead inputs (zero diagonal) get H_jj = 1 and their
    weights are zeroed in place, as in the reference, so that the factorization exists."""
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    weight[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H)
    H_inv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(H_inv, upper=True)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: Sparsity,
                    blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """Return the pruned weight (same shape and dtype as `weight`); the input is not modified."""
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)
    rows, cols = W.shape
    Hinv = inverse_hessian_cholesky(hessian.float(), W, percdamp)
    n_prune = sparsity.m - sparsity.n if sparsity.is_nm else 0

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)

        pruned = torch.zeros_like(W1, dtype=torch.bool)
        if not sparsity.is_nm:
            # unstructured: the lowest-scoring fraction of this block of columns (over all rows)
            score = (W1**2 / d.reshape(1, -1) ** 2).flatten()
            k = int(score.numel() * sparsity.ratio)
            if k:
                pruned.view(-1)[score.topk(k, largest=False).indices] = True

        for i in range(count):
            w = W1[:, i]
            if sparsity.is_nm and i % sparsity.m == 0:
                score = W1[:, i : i + sparsity.m] ** 2 / d[i : i + sparsity.m].reshape(1, -1) ** 2
                pruned.scatter_(1, i + score.topk(n_prune, dim=1, largest=False).indices, True)
            q = w.clone()
            q[pruned[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err

        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype)
