"""Run-relative AST settings (train/budget.py), deterministic mask ties, and the recipe's 'auto' values."""
import warnings

import pytest
import torch

from slimlm import recipe
from slimlm.errors import SlimlmError
from slimlm.ops.sparsity import nm_mask
from slimlm.train import budget
from slimlm.train.optim import AdamW
from slimlm.train.schedules import linear_ramp


def ast(*overrides):
    return recipe.resolve("ast", ["data.train=x.txt", *overrides])


@pytest.mark.parametrize("steps,target", [(40, 0.5), (250, 0.9), (1000, 0.3)])
def test_auto_lambda_gives_the_asked_shrink_without_gradient(steps, target):
    rec = ast(f"train.steps={steps}", f"method.decay.target_shrink={target}")
    lam_max = budget.lambda_max(rec)
    until = budget.last_refresh(rec["method"], steps)
    assert 0 < until < steps
    torch.manual_seed(0)
    w0 = torch.randn(8, 16)
    kept = nm_mask(w0.abs(), 2, 4)
    w = w0.clone().requires_grad_(True)
    lam = {"now": 0.0}
    opt = AdamW([w], lr=rec["train"]["lr"], weight_decay=0.0)
    opt.set_decay({w: lambda: kept}, lambda: lam["now"], "decoupled")
    ramp = budget.ramp_steps(rec["method"]["decay"], steps)
    for step in range(until):  # the engine's lr and lambda schedules, a zero-gradient problem
        opt.param_groups[0]["lr"] = budget.lr_at(rec["train"], step)
        lam["now"] = linear_ramp(step, ramp, lam_max)
        w.grad = torch.zeros_like(w)
        opt.step()
    ratio = w.detach()[~kept] / w0[~kept]
    assert torch.allclose(ratio, torch.full_like(ratio, 1 - target), rtol=1e-4)
    assert torch.equal(w.detach()[kept], w0[kept])
    # the logged integral is the log-shrink, to first order
    assert budget.decay_integral(budget.decay_rates(rec["train"], rec["method"]["decay"]), lam_max, until) == pytest.approx(
        -torch.log(torch.tensor(1 - target)).item(), rel=0.2)


def test_intervals_and_warmup_scale_with_the_run():
    for steps, every in [(20, 2), (100, 5), (245, 12), (10_000, 500)]:
        rec = ast(f"train.steps={steps}")
        assert budget.mask_interval(rec["method"], steps) == every
        refreshes = [s for s in range(1, steps + 1) if budget.refreshes_at(rec["method"], steps, s)]
        assert refreshes and all(s % every == 0 for s in refreshes)
        assert max(refreshes) <= steps - every  # the last Delta-t steps train with the final mask
        assert max(refreshes) == budget.last_refresh(rec["method"], steps)
        assert budget.warmup_steps(rec["train"]) == round(0.05 * steps)
    paper = recipe.resolve("ast-paper", ["data.train=x.txt", "train.steps=40000"])
    assert budget.mask_interval(paper["method"], 40000) == 10 and budget.lambda_max(paper) == 1e-4
    assert budget.warmup_steps(paper["train"]) == 100


def test_settings_that_cannot_act_are_named():
    with pytest.warns(UserWarning, match="method.mask_interval=50 leaves no mask refresh in a run of 40 steps"):
        budget.check_sparse_schedule(ast("train.steps=40", "method.mask_interval=50"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        budget.check_sparse_schedule(ast("train.steps=40"))
    with pytest.warns(UserWarning, match="method.decay.ramp_fraction=2.0 is longer than the run"):
        budget.check_sparse_schedule(ast("train.steps=40", "method.decay.ramp_fraction=2.0"))
    # the only step before the last refresh has lambda 0 (the ramp starts at 0): no lambda reaches the shrink
    with pytest.raises(SlimlmError, match="target_shrink=0.5 cannot be reached"):
        budget.lambda_max(ast("train.steps=2", "method.mask_interval=1", "method.decay.ramp_fraction=1.0"))


def test_auto_values_parse_and_bad_ones_name_the_key():
    rec = ast("train.bf16=true", "method.mask_interval=7", "method.decay.lambda_max=1e-3", "train.warmup_steps=3")
    assert rec["train"]["bf16"] is True and rec["method"]["mask_interval"] == 7
    assert rec["method"]["decay"]["lambda_max"] == 1e-3 and rec["train"]["warmup_steps"] == 3
    assert ast("train.bf16=auto")["train"]["bf16"] == "auto"
    for bad, message in [("method.mask_interval=soon", "'method.mask_interval' must be auto or an integer"),
                         ("train.bf16=maybe", "'train.bf16' must be auto or true or false"),
                         ("method.mask_interval=0", "'method.mask_interval' must be in [1"),
                         ("method.decay.target_shrink=1.5", "'method.decay.target_shrink' must be in (0.0, 1.0]")]:
        with pytest.raises(SlimlmError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            ast(bad)


def test_ties_break_the_same_way_every_time_and_favour_the_mask():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 3.0, 2.0, 2.0, 2.0]])
    first = nm_mask(scores, 2, 4)
    assert first.tolist() == [[True, True, False, False, True, True, False, False]]  # lower index wins
    assert all(torch.equal(nm_mask(scores.clone(), 2, 4), first) for _ in range(5))
    incumbent = torch.tensor([[False, False, True, True, True, False, False, True]])
    assert nm_mask(scores, 2, 4, incumbent).tolist() == [[False, False, True, True, True, False, False, True]]
    # hysteresis: a challenger must beat the incumbent by the margin
    close = torch.tensor([[1.0, 1.04, 2.0, 0.1]])
    keep = torch.tensor([[True, False, True, False]])
    assert nm_mask(close, 2, 4, keep, margin=0.05).tolist() == [[True, False, True, False]]
    assert nm_mask(close, 2, 4, keep, margin=0.0).tolist() == [[False, True, True, False]]
    # the 4-bit checkpoint case: many exact ties, same mask whatever the layout in memory
    torch.manual_seed(0)
    grid = torch.randint(0, 4, (64, 128)).float()
    assert torch.equal(nm_mask(grid, 2, 4), nm_mask(grid.t().contiguous().t(), 2, 4))


def test_cpuinfo_bf16_detection():
    assert budget.cpuinfo_has_bf16("processor: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert budget.cpuinfo_has_bf16("Features\t: fp asimd bf16 i8mm\n")
    assert not budget.cpuinfo_has_bf16("flags\t\t: fpu sse avx2 avx512f\n")
    assert not budget.device_supports_bf16("meta")
