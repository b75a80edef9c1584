"""Pure tensor math for sparsity patterns: parsing, masks from scores, validity checks.

Convention: a weight matrix W has shape (out, in); N:M groups are M consecutive entries of a row
(along the input dimension), of which at most N are non-zero ("2:4" keeps 2 of every 4).
Masks are boolean, True = weight kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SlimlmError


@dataclass(frozen=True)
class Sparsity:
    """Either an N:M pattern (n, m set) or an unstructured fraction of pruned weights (ratio set)."""

    n: int | None = None
    m: int | None = None
    ratio: float | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def target_ratio(self) -> float:
        """Fraction of weights that end up zero."""
        return 1.0 - self.n / self.m if self.is_nm else self.ratio

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"


def parse_sparsity(text: str) -> Sparsity:
    """'2:4' -> N:M pattern; '0.5' -> 50% unstructured. Anything else is a clear error."""
    text = str(text).strip()
    hint = "use N:M with 0 < N < M (e.g. 2:4, 4:8) or a fraction of pruned weights in (0, 1) (e.g. 0.5)"
    if ":" in text:
        parts = text.split(":")
        try:
            n, m = (int(p) for p in parts)
        except ValueError:
            raise SlimlmError(f"malformed sparsity '{text}': {hint}") from None
        if len(parts) != 2 or not 0 < n < m:
            raise SlimlmError(f"malformed sparsity '{text}': {hint}")
        return Sparsity(n=n, m=m)
    try:
        ratio = float(text)
    except ValueError:
        raise SlimlmError(f"malformed sparsity '{text}': {hint}") from None
    if not 0.0 < ratio < 1.0:
        raise SlimlmError(f"malformed sparsity '{text}': {hint}")
    return Sparsity(ratio=ratio)


def _check_groups(width: int, m: int) -> None:
    if width % m:
        raise ValueError(f"input width {width} is not divisible by M={m}")


def nm_mask(scores: torch.Tensor, n: int, m: int, incumbent: torch.Tensor | None = None,
            margin: float = 0.0) -> torch.Tensor:
    """Keep the n highest-scoring entries of every group of m consecutive entries along the last dim.

    Ties are broken the same way every time, on every device: the lower index wins (a stable sort).
    With `incumbent` (the current mask) and `margin` > 0, an entry outside the mask must score more
    than (1 + margin) times an entry inside it to displace it (hysteresis): exact ties and noise-sized
    differences keep the mask as it is."""
    out, width = scores.shape
    _check_groups(width, m)
    groups = scores.reshape(out, width // m, m).float()
    if incumbent is None:
        keep_idx = groups.sort(dim=-1, descending=True, stable=True).indices[..., :n]
    else:
        inside = incumbent.reshape(groups.shape)
        groups = torch.where(inside, groups * (1.0 + margin), groups)
        # ties: incumbents first, then the lower index (two stable sorts)
        first = inside.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices
        by_score = groups.gather(-1, first).sort(dim=-1, descending=True, stable=True).indices
        keep_idx = first.gather(-1, by_score)[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep_idx, True)
    return mask.reshape(out, width)


def row_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the lowest `ratio` fraction of each row (Wanda's per-output comparison group)."""
    out, width = scores.shape
    n_prune = int(width * ratio)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_prune:
        idx = scores.topk(n_prune, dim=1, largest=False).indices
        mask.scatter_(1, idx, False)
    return mask


def layer_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the lowest `ratio` fraction of the whole matrix (magnitude pruning's layer-wise group)."""
    flat = scores.flatten()
    n_prune = int(flat.numel() * ratio)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if n_prune:
        mask[flat.topk(n_prune, largest=False).indices] = False
    return mask.reshape(scores.shape)


def mask_from_scores(scores: torch.Tensor, sparsity: Sparsity, group: str = "row") -> torch.Tensor:
    """N:M mask, or an unstructured mask compared per row ('row') or over the layer ('layer')."""
    if sparsity.is_nm:
        return nm_mask(scores, sparsity.n, sparsity.m)
    if group == "row":
        return row_mask(scores, sparsity.ratio)
    if group == "layer":
        return layer_mask(scores, sparsity.ratio)
    raise ValueError(f"unknown comparison group {group!r}")


def is_valid_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive entries of each row has at most n non-zeros."""
    out, width = weight.shape
    if width % m:
        return False
    nonzero = (weight.reshape(out, width // m, m) != 0).sum(-1)
    return bool((nonzero <= n).all())


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((weight == 0).sum()) / weight.numel()


def singular_value_stats(weight: torch.Tensor, energy: float = 0.9) -> tuple[int, int]:
    """(numerical rank, effective rank): the effective rank is the number of singular values
    needed to hold `energy` of the spectrum's energy (sum of squared singular values)."""
    s = torch.linalg.svdvals(weight.detach().double())
    if s.numel() == 0 or s[0] == 0:
        return 0, 0
    tol = s[0] * max(weight.shape) * torch.finfo(weight.dtype if weight.is_floating_point() else torch.float32).eps
    rank = int((s > tol).sum())
    cumulative = torch.cumsum(s**2, 0) / (s**2).sum()
    effective = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype)).item()) + 1
    return rank, min(effective, s.numel())
