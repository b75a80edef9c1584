import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.ops.sparsity import is_valid_nm, layer_mask, nm_mask, parse_sparsity, row_mask, singular_value_stats, sparsity_of


def test_parse_sparsity():
    s = parse_sparsity("2:4")
    assert (s.n, s.m, s.is_nm, s.target_ratio) == (2, 4, True, 0.5)
    assert parse_sparsity("4:8").target_ratio == 0.5
    u = parse_sparsity("0.5")
    assert (u.is_nm, u.ratio) == (False, 0.5)


@pytest.mark.parametrize("bad", ["3:2", "2:0", "1.5", "0", "4:4", "a:b", "2:4:8", "", "-0.1"])
def test_parse_sparsity_rejects(bad):
    with pytest.raises(SlimlmError, match="malformed sparsity"):
        parse_sparsity(bad)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_top_n_per_group(n, m):
    torch.manual_seed(0)
    scores = torch.randn(16, 64)
    mask = nm_mask(scores, n, m)
    groups = mask.reshape(16, -1, m)
    assert (groups.sum(-1) == n).all()
    # the kept entries are the n largest of their group
    g = scores.reshape(16, -1, m)
    kept_min = torch.where(groups, g, torch.inf).amin(-1)
    dropped_max = torch.where(~groups, g, -torch.inf).amax(-1)
    assert (kept_min >= dropped_max).all()
    assert is_valid_nm(scores * mask, n, m)
    assert sparsity_of(scores * mask) == pytest.approx(1 - n / m)


def test_is_valid_nm_detects_violations():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    assert is_valid_nm(w, 2, 4)
    w[0, 1] = 3.0
    assert not is_valid_nm(w, 2, 4)
    assert is_valid_nm(w, 4, 8) is False  # 5 non-zeros in the group of 8
    assert not is_valid_nm(torch.ones(2, 6), 2, 4)  # width not divisible


def test_row_and_layer_masks_are_exact_and_differ_in_group():
    torch.manual_seed(0)
    scores = torch.randn(8, 40).abs()
    scores[0] *= 100  # one row dominates: a layer-wise comparison keeps it all
    r = row_mask(scores, 0.5)
    assert (r.sum(1) == 20).all()
    lm = layer_mask(scores, 0.5)
    assert lm.sum() == 160
    assert lm[0].all() and not (lm.sum(1) == 20).all()


def test_singular_value_stats():
    torch.manual_seed(0)
    a, b = torch.randn(30, 3), torch.randn(3, 20)
    rank, eff = singular_value_stats(a @ b)
    assert rank == 3 and 1 <= eff <= 3
    # a diagonal spectrum with known energies: 0.5, 0.3, 0.15, 0.05 -> 90% needs 3 values
    w = torch.diag(torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt())
    assert singular_value_stats(w) == (4, 3)
