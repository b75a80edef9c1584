"""SparseGPT (Frantar & Alistarh, 2023): prune one layer with the OBS update, column block by column block.

Pure tensor math: takes W (out, in) and the layer Hessian H = 2/n * sum x x^T (in, in); returns the
pruned and updated weight. Follows the published algorithm: dampening by a fraction of the mean
diagonal, Cholesky of the inverse Hessian, the mask chosen lazily per block of columns (for N:M,
per group of M columns inside the block) by w^2 / [H^-1]_jj^2, and the error of each pruned column
spread over the not-yet-processed columns.
"""
from __future__ import annotations

from contextlib import contextmanager

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
    """Return the pruned weight (same shape and dtype as `weight`); the input is not modified.

    The per-column loop is the published one with its Python overhead cut (issue 19): the weight is
    held transposed (in, out), so a column is a contiguous row and its update one in-place `addr_`;
    the pruned columns' errors are written into the block's error matrix directly (no boolean
    indexing, no per-column clones), and the pruned weights are zeroed once per block. Column i is
    not updated by its own error (the published loop sets it to its pruned value q there): its
    value at its turn, times the mask, is q. On CPU the column loop runs on one thread: its operations
    are too small to share, and on a busy machine every shared one waits for the slowest thread
    (benchmarks: 20-50x slower on two loaded cores); the per-block matmuls keep every thread.
    """
    W = weight.detach().float()
    rows, cols = W.shape
    W = W.t().contiguous()  # (in, out): column j of the weight is row j here
    Hinv = inverse_hessian_cholesky(hessian.float(), W.t(), percdamp)
    m = sparsity.m if sparsity.is_nm else 0
    n_prune = sparsity.m - sparsity.n if sparsity.is_nm else 0

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[i1:i2]  # a view: updated in place
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        pruned = torch.zeros_like(W1)  # 1.0 where pruned
        if not m:
            # unstructured: the lowest-scoring fraction of this block of columns (over all rows)
            score = (W1**2 / d.reshape(-1, 1) ** 2).flatten()
            k = int(score.numel() * sparsity.ratio)
            if k:
                pruned.view(-1)[score.topk(k, largest=False).indices] = 1.0
        Err1 = torch.empty_like(W1)
        with _one_thread(W.device):
            for i in range(count):
                if m and i % m == 0:  # N:M: the group's mask from its columns as they are now
                    score = W1[i : i + m] ** 2 / d[i : i + m].reshape(-1, 1) ** 2
                    pruned[i : i + m].scatter_(0, score.topk(n_prune, dim=0, largest=False).indices, 1.0)
                err = torch.mul(W1[i], pruned[i], out=Err1[i]).div_(d[i])  # (w - q) / d
                if i + 1 < count:
                    W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)
        W1.masked_fill_(pruned.bool(), 0.0)  # q: each column as it was at its turn, pruned weights zero
        if i2 < cols:
            W[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)
    return W.t().contiguous().to(weight.dtype)


@contextmanager
def _one_thread(device: torch.device):
    """torch on one CPU thread inside the block (restored after); other devices: unchanged."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
