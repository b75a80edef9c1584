import math

import pytest
import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.ops.factorized import LowRankLinear, MixedRankLinear, linear_view, replace_module
from slimlm.ops.lowrank import FACTORIZATIONS, factorize, fisher_svd, importance_weights, lowrank_parameters, rank_for_budget, sparsity_aware_svd, truncated_svd, weighted_error, weighted_low_rank
from slimlm.ops.sparsity import row_mask


def low_rank_matrix(out, inp, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g)


def random_matrix(out, inp, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# ranks and budgets

def test_rank_for_budget_values():
    assert rank_for_budget(64, 128, 0.25) == 10  # floor(0.25 * 64 * 128 / 192) = floor(10.67)
    assert rank_for_budget(64, 128, 1.0) == 42
    assert rank_for_budget(128, 64, 0.25) == 10  # symmetric in out/in
    assert rank_for_budget(64, 128, 0.001) == 1  # never below one component
    assert rank_for_budget(4, 4, 1.0) == 2


@pytest.mark.parametrize("out,inp,fraction", [(64, 128, 0.25), (96, 96, 0.1), (128, 96, 0.5), (32, 256, 0.7)])
def test_factor_parameters_stay_within_budget(out, inp, fraction):
    rank = rank_for_budget(out, inp, fraction)
    assert 1 <= rank <= min(out, inp)
    assert lowrank_parameters(out, inp, rank, bias=False) <= fraction * out * inp
    # one more component would break the budget: the rank is the largest that fits
    assert lowrank_parameters(out, inp, rank + 1, bias=False) > fraction * out * inp


def test_lowrank_parameters_counts_bias():
    assert lowrank_parameters(64, 128, 10, bias=False) == 10 * 192
    assert lowrank_parameters(64, 128, 10, bias=True) == 10 * 192 + 64


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, math.nan])
def test_rank_for_budget_rejects_bad_fraction(bad):
    with pytest.raises(SlimlmError, match=f"fraction {bad}"):
        rank_for_budget(64, 128, bad)


# ---------------------------------------------------------------------------------------------
# plain and Fisher-weighted SVD

def test_truncated_svd_is_exact_on_a_low_rank_matrix():
    W = low_rank_matrix(40, 30, 3)
    A, B = truncated_svd(W, 3)
    assert A.shape == (40, 3) and B.shape == (3, 30) and A.dtype == W.dtype
    torch.testing.assert_close(A @ B, W, atol=1e-4, rtol=1e-4)
    # balanced split: A^T A = B B^T = diag(S)
    torch.testing.assert_close(A.T @ A, B @ B.T, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("rank", [1, 5, 20])
def test_truncated_svd_error_is_the_discarded_spectrum(rank):
    W = random_matrix(48, 32, seed=1).double()
    A, B = truncated_svd(W, rank)
    s = torch.linalg.svdvals(W)
    ones = torch.ones_like(W)
    assert weighted_error(W, A, B, ones) == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-9)


def test_truncated_svd_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank 0"):
        truncated_svd(random_matrix(8, 6), 0)
    with pytest.raises(ValueError, match="rank 7"):
        truncated_svd(random_matrix(8, 6), 7)


def test_fisher_svd_with_uniform_fisher_equals_plain_svd():
    W = random_matrix(64, 48, seed=2)
    A, B = fisher_svd(W, torch.full_like(W, 2.5), 8)
    A0, B0 = truncated_svd(W, 8)
    torch.testing.assert_close(A @ B, A0 @ B0, atol=1e-5, rtol=1e-5)


def test_fisher_svd_beats_plain_svd_on_row_weighted_error():
    W = random_matrix(64, 48, seed=3)
    g = torch.Generator().manual_seed(4)
    row_scale = torch.exp(2 * torch.randn(64, 1, generator=g))  # very uneven row importances
    fisher = torch.rand(64, 48, generator=g) * row_scale
    row_weights = fisher.sum(1, keepdim=True).expand_as(W)
    for rank in (2, 8, 16):
        fisher_err = weighted_error(W, *fisher_svd(W, fisher, rank), row_weights)
        plain_err = weighted_error(W, *truncated_svd(W, rank), row_weights)
        assert fisher_err <= plain_err * (1 + 1e-6)
    assert fisher_err < 0.9 * plain_err  # and by a margin, with rows this uneven


def test_fisher_svd_survives_rows_without_gradient():
    W = random_matrix(16, 12, seed=5)
    fisher = torch.rand(16, 12, generator=torch.Generator().manual_seed(6))
    fisher[3] = 0
    A, B = fisher_svd(W, fisher, 4)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    A, B = fisher_svd(W, torch.zeros_like(W), 4)  # no information: plain SVD
    A0, B0 = truncated_svd(W, 4)
    torch.testing.assert_close(A @ B, A0 @ B0, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# weighted (EM) low-rank approximation and the sparsity-aware SVD

def test_weighted_low_rank_beats_plain_svd_and_its_first_iterate():
    W = random_matrix(96, 64, seed=7)
    weights = torch.rand(96, 64, generator=torch.Generator().manual_seed(8))
    rank = 8
    em_err = weighted_error(W, *weighted_low_rank(W, weights, rank, iters=20), weights)
    plain_err = weighted_error(W, *truncated_svd(W, rank), weights)
    first_err = weighted_error(W, *truncated_svd(weights * W, rank), weights)
    zero_iters_err = weighted_error(W, *weighted_low_rank(W, weights, rank, iters=0), weights)
    assert zero_iters_err == pytest.approx(first_err, rel=1e-6)
    assert em_err <= plain_err and em_err <= first_err
    assert em_err <= weighted_error(W, *weighted_low_rank(W, weights, rank, iters=1), weights)


def test_weighted_low_rank_scales_weights_above_one():
    W = random_matrix(32, 24, seed=9)
    weights = torch.rand(32, 24, generator=torch.Generator().manual_seed(10))
    weights[0, 0] = 1.0  # so that scaling 5 * weights by its max gives back weights
    A, B = weighted_low_rank(W, weights, 4, iters=5)
    A5, B5 = weighted_low_rank(W, 5 * weights, 4, iters=5)
    torch.testing.assert_close(A @ B, A5 @ B5, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="non-negative"):
        weighted_low_rank(W, -weights, 4)


def test_weighted_low_rank_from_init_never_worse_than_init():
    W = random_matrix(48, 40, seed=11)
    weights = torch.rand(48, 40, generator=torch.Generator().manual_seed(12))
    init = truncated_svd(W, 6)
    A, B = weighted_low_rank(W, weights, 6, iters=10, init=init)
    assert weighted_error(W, A, B, weights) <= weighted_error(W, *init, weights)


def test_weighted_low_rank_completes_a_low_rank_matrix():
    # zero-weight entries hold garbage; the EM fills them from the low-rank structure of the rest
    W = low_rank_matrix(48, 40, 2, seed=13)
    observed = torch.rand(48, 40, generator=torch.Generator().manual_seed(14)) > 0.2
    corrupted = torch.where(observed, W, torch.full_like(W, 50.0))
    A, B = weighted_low_rank(corrupted, observed.float(), 2, iters=60)
    assert weighted_error(corrupted, A, B, observed.float()) < 1e-4 * float((W[observed] ** 2).sum())


def test_importance_weights():
    g = torch.Generator().manual_seed(15)
    scores = torch.randn(32, 24, generator=g)
    mask = row_mask(scores.abs(), 0.5)
    w = importance_weights(mask, scores, floor=0.2)
    assert (w[~mask] == 0).all()
    kept = w[mask]
    assert kept.min() == pytest.approx(0.2) and kept.max() == pytest.approx(1.0)
    assert ((kept >= 0.2 - 1e-6) & (kept <= 1 + 1e-6)).all()
    # ordered like the scores
    order = scores[mask].argsort()
    assert (kept[order].diff() >= 0).all()
    assert (importance_weights(mask, torch.ones(32, 24))[mask] == 1).all()
    assert (importance_weights(torch.zeros(32, 24, dtype=torch.bool), scores) == 0).all()


def test_sparsity_aware_svd_beats_plain_svd_of_the_pruned_matrix():
    g = torch.Generator().manual_seed(16)
    W = torch.randn(128, 96, generator=g)
    scores = torch.rand(128, 96, generator=g)
    mask = row_mask(W.abs(), 0.5)
    weights = importance_weights(mask, scores)
    for rank in (4, 16):
        A, B = sparsity_aware_svd(W, mask, scores, rank, iters=20)
        aware_err = weighted_error(W, A, B, weights)
        plain_err = weighted_error(W, *truncated_svd(W * mask, rank), weights)
        assert aware_err < plain_err


# ---------------------------------------------------------------------------------------------
# dispatch

def test_factorize_dispatches():
    g = torch.Generator().manual_seed(17)
    W = torch.randn(24, 16, generator=g)
    mask = row_mask(W.abs(), 0.5)
    scores, fisher = torch.rand(24, 16, generator=g), torch.rand(24, 16, generator=g)
    gram = torch.randn(16, 64, generator=g) @ torch.randn(64, 16, generator=g)
    assert FACTORIZATIONS == ("svd", "fisher", "sparsity-aware", "activation")
    for method in FACTORIZATIONS:
        A, B = factorize(method, W, 4, mask=mask, scores=scores, fisher=fisher, iters=3, gram=gram @ gram.T)
        assert A.shape == (24, 4) and B.shape == (4, 16)
    # 'svd' with a mask factors the pruned matrix
    A, B = factorize("svd", W, 4, mask=mask)
    A0, B0 = truncated_svd(W * mask, 4)
    torch.testing.assert_close(A @ B, A0 @ B0)


def test_factorize_errors_say_what_is_missing():
    W = random_matrix(8, 8)
    with pytest.raises(SlimlmError, match="unknown factorization 'qr'.*svd, fisher, sparsity-aware"):
        factorize("qr", W, 2)
    with pytest.raises(SlimlmError, match="Fisher information.*pruning stage.*calibration data"):
        factorize("fisher", W, 2)
    with pytest.raises(SlimlmError, match="mask and the importance scores.*pruning stage"):
        factorize("sparsity-aware", W, 2, mask=W > 0)


# ---------------------------------------------------------------------------------------------
# modules

def test_lowrank_linear_from_factors():
    g = torch.Generator().manual_seed(18)
    A, B, b = torch.randn(20, 5, generator=g), torch.randn(5, 12, generator=g), torch.randn(20, generator=g)
    x = torch.randn(3, 7, 12, generator=g)
    layer = LowRankLinear.from_factors(A, B, b)
    assert (layer.in_features, layer.out_features, layer.rank) == (12, 20, 5)
    torch.testing.assert_close(layer(x), x @ (A @ B).T + b)
    torch.testing.assert_close(layer.merged_weight(), A @ B)
    assert "rank=5" in repr(layer)
    no_bias = LowRankLinear.from_factors(A, B)
    assert no_bias.up.bias is None
    torch.testing.assert_close(no_bias(x), x @ (A @ B).T)


def test_active_rank_uses_the_leading_components():
    g = torch.Generator().manual_seed(19)
    A, B, b = torch.randn(20, 6, generator=g), torch.randn(6, 12, generator=g), torch.randn(20, generator=g)
    x = torch.randn(4, 12, generator=g)
    layer = LowRankLinear.from_factors(A, B, b)
    layer.active_rank = 2
    torch.testing.assert_close(layer(x), x @ (A[:, :2] @ B[:2]).T + b)
    torch.testing.assert_close(layer.merged_weight(), A[:, :2] @ B[:2])
    assert "active_rank=2" in repr(layer)
    layer.active_rank = 6  # at (or above) the full rank: the plain forward
    torch.testing.assert_close(layer(x), x @ (A @ B).T + b)


def make_mixed(bias=True, seed=20):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(16, 12, generator=g)
    mask = row_mask(W.abs(), 0.5)
    b = torch.randn(16, generator=g) if bias else None
    A, B = truncated_svd(W * mask, 4)
    return MixedRankLinear(W, mask, b, LowRankLinear.from_factors(A, B)), W, mask, b, A, B


def test_mixed_rank_linear_paths():
    mixed, W, mask, b, A, B = make_mixed()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(21))
    assert mixed.use_lowrank is False
    torch.testing.assert_close(mixed(x), x @ (W * mask).T + b)
    mixed.use_lowrank = True
    torch.testing.assert_close(mixed(x), x @ (A @ B).T + b)
    final = mixed.to_lowrank()
    assert isinstance(final, LowRankLinear) and final.up.bias is not None
    torch.testing.assert_close(final(x), mixed(x))
    # its own tensors: training the final layer does not touch the mixed one
    with torch.no_grad():
        final.up.bias.add_(1)
    assert not torch.allclose(final(x), mixed(x))

    no_bias, W, mask, _, A, B = make_mixed(bias=False)
    torch.testing.assert_close(no_bias(x), x @ (W * mask).T)
    no_bias.use_lowrank = True
    torch.testing.assert_close(no_bias.to_lowrank()(x), no_bias(x))


def test_mixed_rank_linear_gradients():
    mixed, W, mask, b, A, B = make_mixed()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(22))
    mixed(x).square().sum().backward()
    assert (mixed.weight.grad[~mask] == 0).all() and (mixed.weight.grad[mask] != 0).all()
    assert mixed.bias.grad is not None and mixed.lowrank.up.weight.grad is None
    mixed.zero_grad(set_to_none=True)
    mixed.use_lowrank = True
    mixed(x).square().sum().backward()
    assert mixed.weight.grad is None
    assert mixed.bias.grad is not None and mixed.lowrank.down.weight.grad is not None


def test_mixed_rank_linear_rejects_a_lowrank_bias_and_wrong_shapes():
    W, mask = torch.ones(4, 3), torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="bias=False"):
        MixedRankLinear(W, mask, None, LowRankLinear(3, 4, 2, bias=True))
    with pytest.raises(ValueError, match="shape"):
        MixedRankLinear(W.T, mask.T, None, LowRankLinear(3, 4, 2, bias=False))


def test_lowrank_replaces_a_conv1d_at_full_rank():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(23)
    conv = Conv1D(20, 12)  # nf=out=20, nx=in=12: weight stored as (12, 20)
    nn.init.normal_(conv.bias)
    W, b = linear_view(conv)
    assert W.shape == (20, 12)
    layer = LowRankLinear.from_factors(*truncated_svd(W, 12), b)
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-5)

    linear = nn.Linear(12, 20)
    W, b = linear_view(linear)
    assert W.data_ptr() == linear.weight.data_ptr() and b.data_ptr() == linear.bias.data_ptr()
    with pytest.raises(TypeError, match="Conv1D"):
        linear_view(nn.ReLU())


def test_replace_module():
    model = nn.Sequential(nn.ModuleDict({"proj": nn.Linear(4, 4)}), nn.Linear(4, 2))
    new = LowRankLinear(4, 4, 2)
    replace_module(model, "0.proj", new)
    assert model[0]["proj"] is new
    replace_module(model, "1", nn.Identity())
    assert isinstance(model[1], nn.Identity)
    with pytest.raises(AttributeError):
        replace_module(model, "0.missing", nn.Identity())


def test_sparsity_aware_svd_with_pruned_weight_pulls_pruned_entries_toward_zero():
    from slimlm.ops.lowrank import sparsity_aware_svd

    g = torch.Generator().manual_seed(3)
    W = torch.randn(48, 40, generator=g)
    mask = torch.rand(48, 40, generator=g) < 0.2
    scores = torch.rand(48, 40, generator=g)
    free = sparsity_aware_svd(W, mask, scores, 6, iters=15)
    held = sparsity_aware_svd(W, mask, scores, 6, iters=15, pruned_weight=0.5)
    off = lambda f: float(((f[0] @ f[1])[~mask]) .pow(2).sum())  # noqa: E731
    assert off(held) < off(free)
