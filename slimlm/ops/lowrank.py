"""Pure tensor math for low-rank factorization (LPAF stage 2): ranks from a parameter budget and
four ways to factor a (pruned) weight matrix.

Convention: W has shape (out, in); a rank-r factorization is A (out x r) and B (r x in), W ~= A @ B.
Factors are "balanced" (A = U sqrt(S), B = sqrt(S) V^T), so neither carries all of the scale, and
ordered by singular value, so keeping the first r' components is the best rank-r' truncation.
The SVDs run in float64 (cheap next to training, and weighted iterations accumulate rounding);
the factors come back in W's dtype.
"""
from __future__ import annotations

import math

import torch

from ..errors import SlimlmError

FACTORIZATIONS = ("svd", "fisher", "sparsity-aware", "activation")

Factors = tuple[torch.Tensor, torch.Tensor]


def rank_for_budget(out_features: int, in_features: int, fraction: float) -> int:
    """r = floor(fraction * out * in / (out + in)): the factors then hold at most `fraction` of the
    dense matrix's parameters (clamped to [1, min(out, in)])."""
    if not 0.0 < fraction <= 1.0:  # also rejects NaN
        raise SlimlmError(f"parameter fraction {fraction} is out of range: it must be in (0, 1]")
    rank = math.floor(fraction * out_features * in_features / (out_features + in_features))
    return max(1, min(rank, out_features, in_features))


def lowrank_parameters(out_features: int, in_features: int, rank: int, bias: bool) -> int:
    """Parameters of A, B (and the bias) of a rank-r layer."""
    return rank * (out_features + in_features) + (out_features if bias else 0)


def _check_rank(W: torch.Tensor, rank: int) -> None:
    if W.dim() != 2:
        raise ValueError(f"expected a matrix, got a tensor of shape {tuple(W.shape)}")
    if not 1 <= rank <= min(W.shape):
        raise ValueError(f"rank {rank} is out of range for a {W.shape[0]}x{W.shape[1]} matrix")


def _svd_r(X: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading `rank` singular triplets (U_r, S_r, Vh_r) of X."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank]


def _balanced(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, dtype: torch.dtype) -> Factors:
    root = S.sqrt()
    return (U * root).to(dtype), (root[:, None] * Vh).to(dtype)


def truncated_svd(W: torch.Tensor, rank: int) -> Factors:
    """Best rank-r approximation in Frobenius norm (Eckart-Young), as balanced factors."""
    _check_rank(W, rank)
    return _balanced(*_svd_r(W.detach().double(), rank), W.dtype)


def fisher_svd(W: torch.Tensor, fisher: torch.Tensor, rank: int) -> Factors:
    """Fisher-weighted SVD (Hsu et al. 2022): minimise sum_i I_i ||W_i - (AB)_i||^2, where the row
    importance I_i = sum_j fisher_ij and `fisher` (W's shape) holds accumulated squared gradients.

    With d = sqrt(I), the objective is ||diag(d) (W - AB)||^2, so the truncated SVD of diag(d) W,
    scaled back by 1/d, is its exact minimiser.
    """
    _check_rank(W, rank)
    if fisher.shape != W.shape:
        raise ValueError(f"fisher has shape {tuple(fisher.shape)}, the weight {tuple(W.shape)}")
    d = fisher.detach().double().clamp(min=0).sum(1).sqrt()
    if d.max() == 0:  # no information at all: every row matters alike
        d = torch.ones_like(d)
    # rows that never saw a gradient would divide by zero; a relative floor keeps them (almost) free
    d = d.clamp(min=1e-6 * d.max())
    U, S, Vh = _svd_r(d[:, None] * W.detach().double(), rank)
    return _balanced(U / d[:, None], S, Vh, W.dtype)


def activation_svd(W: torch.Tensor, gram: torch.Tensor, rank: int, damp: float = 0.01) -> Factors:
    """Minimise the layer's output error on calibration inputs, ||(W - AB) X||_F (X: in x tokens),
    given only gram = X X^T (in x in). With gram + damp * mean(diag) * I = L L^T (Cholesky), the error is
    ||(W - AB) L||_F, so the truncated SVD of W L, mapped back by L^-1, is its exact minimiser (the
    whitening of SVD-LLM). Plain SVD is the special case gram = I: it weighs every input direction
    alike, however rarely the inputs use it. `damp` keeps directions no calibration token touched in
    the fit (as GPTQ's dampening)."""
    _check_rank(W, rank)
    n = W.shape[1]
    if gram.shape != (n, n):
        raise ValueError(f"gram has shape {tuple(gram.shape)}, expected ({n}, {n}) for a weight of {n} inputs")
    C = gram.detach().double()
    C = C + damp * C.diagonal().mean().clamp(min=1e-12) * torch.eye(n, dtype=C.dtype, device=C.device)
    L = torch.linalg.cholesky(C)
    U, S, Vh = _svd_r(W.detach().double() @ L, rank)
    root = S.sqrt()
    B = torch.linalg.solve_triangular(L, root[:, None] * Vh, upper=False, left=False)  # (sqrt(S) Vh) L^-1
    return (U * root).to(W.dtype), B.to(W.dtype)


def output_error(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error of the factors against W on inputs with second moments `gram`:
    ||(W - AB) X||^2 / ||W X||^2 = tr(R gram R^T) / tr(W gram W^T), R = W - AB."""
    W64, C = W.detach().double(), gram.detach().double()
    R = W64 - A.detach().double() @ B.detach().double()
    return float(((R @ C) * R).sum() / ((W64 @ C) * W64).sum().clamp(min=1e-30))


def weighted_error(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor) -> float:
    """sum weights * (W - A B)^2."""
    residual = W.detach().double() - A.detach().double() @ B.detach().double()
    return float((weights.detach().double() * residual**2).sum())


def weighted_low_rank(W: torch.Tensor, weights: torch.Tensor, rank: int, iters: int = 20,
                      init: Factors | None = None) -> Factors:
    """Minimise sum weights_ij (W_ij - (AB)_ij)^2 by the EM iteration of Srebro & Jaakkola (2003):
    X <- rank-r SVD of (weights * W + (1 - weights) * X), i.e. fill in the entries we care less about
    with the current guess and refit. Weights must be >= 0; above 1 they are scaled by their max
    (the iteration needs weights in [0, 1]; scaling does not move the minimiser).

    Starts from the rank-r SVD of weights * W, or from `init` = (A, B). Returns the balanced factors
    of the iterate with the lowest weighted error (the iteration is monotone in exact arithmetic;
    keeping the best guards against rounding).
    """
    _check_rank(W, rank)
    if weights.shape != W.shape:
        raise ValueError(f"weights have shape {tuple(weights.shape)}, the weight {tuple(W.shape)}")
    target = W.detach().double()
    w = weights.detach().double()
    if (w < 0).any():
        raise ValueError("weights must be non-negative")
    if w.max() > 1:
        w = w / w.max()

    if init is None:
        U, S, Vh = _svd_r(w * target, rank)
    else:
        A0, B0 = (t.detach().double() for t in init)
        if A0.shape[1] > rank:
            raise ValueError(f"init has rank {A0.shape[1]}, more than the requested {rank}")
        # re-factor the product so the iterate is ordered by singular value with exactly r components
        U, S, Vh = _svd_r(A0 @ B0, rank)

    def error_of(X: torch.Tensor) -> float:
        return float((w * (target - X) ** 2).sum())

    X = (U * S) @ Vh
    best_error, best = error_of(X), (U, S, Vh)
    for _ in range(iters):
        U, S, Vh = _svd_r(w * target + (1 - w) * X, rank)
        X = (U * S) @ Vh
        error = error_of(X)
        if error < best_error:
            best_error, best = error, (U, S, Vh)
    return _balanced(*best, W.dtype)


def importance_weights(mask: torch.Tensor, scores: torch.Tensor, floor: float = 0.1) -> torch.Tensor:
    """Per-entry weights for the sparsity-aware SVD: 0 where the mask pruned (the pruning decided those
    entries do not matter, so the factors may put anything there); on kept entries the scores min-max
    scaled to [floor, 1] (all-equal scores -> 1). The floor keeps every kept weight in the fit."""
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor {floor} must be in [0, 1]")
    if mask.shape != scores.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, the scores {tuple(scores.shape)}")
    kept = mask.bool()
    dtype = scores.dtype if scores.is_floating_point() else torch.get_default_dtype()
    weights = torch.zeros(scores.shape, dtype=dtype, device=scores.device)
    if not kept.any():
        return weights
    s = scores.detach().double()[kept]
    span = s.max() - s.min()
    if span > 0:
        weights[kept] = (floor + (1 - floor) * (s - s.min()) / span).to(dtype)
    else:
        weights[kept] = 1
    return weights


def sparsity_aware_svd(W: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, rank: int,
                       iters: int = 20, floor: float = 0.1, pruned_weight: float = 0.0) -> Factors:
    """Factor the pruned matrix mask * W, fitting its kept entries weighted by their importance scores.
    `pruned_weight` > 0 also pulls the pruned entries toward their zeros with that weight (0: free)."""
    weights = importance_weights(mask, scores, floor)
    if pruned_weight:
        weights = torch.where(mask.bool(), weights, torch.full_like(weights, pruned_weight))
    return weighted_low_rank(W * mask, weights, rank, iters=iters)


def factorize(method: str, W: torch.Tensor, rank: int, mask: torch.Tensor | None = None,
              scores: torch.Tensor | None = None, fisher: torch.Tensor | None = None,
              iters: int = 20, pruned_weight: float = 0.0, gram: torch.Tensor | None = None) -> Factors:
    """Factor W (pruned by `mask` when one is given) with one of FACTORIZATIONS."""
    if method not in FACTORIZATIONS:
        raise SlimlmError(f"unknown factorization '{method}': choose one of {', '.join(FACTORIZATIONS)}")
    pruned = W * mask if mask is not None else W
    if method == "svd":
        return truncated_svd(pruned, rank)
    if method == "fisher":
        if fisher is None:
            raise SlimlmError("the 'fisher' factorization needs Fisher information (accumulated squared "
                              "gradients): run the pruning stage first or give calibration data")
        return fisher_svd(pruned, fisher, rank)
    if method == "activation":
        if gram is None:
            raise SlimlmError("the 'activation' factorization needs the layer's input statistics (X X^T on "
                              "calibration batches): give training data, or use 'svd'")
        return activation_svd(pruned, gram, rank)
    if mask is None or scores is None:
        raise SlimlmError("the 'sparsity-aware' factorization needs the pruning mask and the importance "
                          "scores: run the pruning stage first, or use 'svd'")
    return sparsity_aware_svd(W, mask, scores, rank, iters=iters, pruned_weight=pruned_weight)
