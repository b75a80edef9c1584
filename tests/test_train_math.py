"""Pure pieces of sparse training: STE, schedules, the AdamW decay variants, SLoRB, KD."""

import pytest
import torch
from torch import nn

from slimlm.ops import masked, slorb
from slimlm.ops.sparsity import is_valid_nm, nm_mask
from slimlm.train.distill import kd_loss
from slimlm.train.optim import AdamW
from slimlm.train.schedules import cubic, linear_ramp, warmup_cosine


def test_ste_passes_gradient_to_pruned_weights_and_masking_does_not():
    torch.manual_seed(0)
    for ste in (True, False):
        layer = nn.Linear(8, 4, bias=False)
        mask = nm_mask(layer.weight.detach().abs(), 2, 4)
        masked.attach_mask(layer, mask, ste=ste)
        assert torch.equal(layer.weight, masked.dense_weight(layer) * mask)  # sparse forward
        layer(torch.randn(16, 8)).sum().backward()
        grad = masked.dense_weight(layer).grad
        if ste:
            assert (grad[~mask] != 0).all()  # pruned weights still learn
        else:
            assert (grad[~mask] == 0).all()


def test_lambda_schedule_ramps_then_holds():
    assert linear_ramp(0, 100, 1e-4) == 0
    assert linear_ramp(50, 100, 1e-4) == pytest.approx(5e-5)
    assert linear_ramp(100, 100, 1e-4) == linear_ramp(1000, 100, 1e-4) == 1e-4


def test_lr_and_cubic_schedules():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert cubic(0, 100, 1.0, 0.1, start=10, end_hold=20) == 1.0
    assert cubic(80, 100, 1.0, 0.1, start=10, end_hold=20) == pytest.approx(0.1)
    mid = cubic(45, 100, 1.0, 0.1, start=10, end_hold=20)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5**3)


def test_adamw_without_extra_term_matches_torch():
    torch.manual_seed(0)
    a, b = torch.randn(5, 6, requires_grad=True), None
    b = a.detach().clone().requires_grad_(True)
    ours = AdamW([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(5):
        g = torch.randn(5, 6)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_decay_variants_pull_pruned_weights_to_zero_differently():
    """'gradient' puts the decay in both moments; 'second-moment' (the paper's) keeps it out of m;
    'decoupled' stays out of Adam altogether."""
    torch.manual_seed(0)
    w0 = torch.randn(4, 8)
    kept = nm_mask(w0.abs(), 2, 4)
    pruned = ~kept
    results = {}
    for mode in ("gradient", "second-moment", "decoupled"):
        w = w0.clone().requires_grad_(True)
        opt = AdamW([w], lr=1e-2, weight_decay=0.0)
        opt.set_decay({w: lambda: kept}, lambda: 0.5, mode)
        for _ in range(20):
            w.grad = torch.zeros_like(w)
            opt.step()
        m = opt.state[w]["exp_avg"]
        results[mode] = (w.detach(), m)
        assert (w.detach()[pruned].abs() < w0[pruned].abs()).all()  # pruned weights shrink
        assert torch.equal(w.detach()[~pruned], w0[~pruned])  # kept ones untouched (zero gradient)
    assert (results["gradient"][1][pruned] != 0).all()
    assert (results["second-moment"][1] == 0).all()  # the decay never entered the first moment
    assert (results["decoupled"][1] == 0).all()
    # decoupled: exactly w * (1 - lr * lambda)^steps
    assert torch.allclose(results["decoupled"][0][pruned], w0[pruned] * (1 - 1e-2 * 0.5) ** 20, atol=1e-6)


def _reference_step(p, state, lr, betas, eps, wd, kept, lam, mode):
    """One AdamW step with the decay, one tensor at a time, as the equations read (optim.py)."""
    beta1, beta2 = betas
    state["t"] = state.get("t", 0) + 1
    t = state["t"]
    m, v = state.setdefault("m", torch.zeros_like(p)), state.setdefault("v", torch.zeros_like(p))
    g = p.grad.clone()
    d = lam * (p.detach() * ~kept) if kept is not None else None
    if d is not None and mode == "gradient":
        g = g + d
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    u, g2 = (m + d, g + d) if d is not None and mode == "second-moment" else (m, g)
    v.mul_(beta2).addcmul_(g2, g2, value=1 - beta2)
    with torch.no_grad():
        p.mul_(1 - lr * wd)
        if d is not None and mode == "decoupled":  # after the weight decay, as AdamW's order
            p.sub_(lr * lam * (p * ~kept))
        p.addcdiv_(u, (v / (1 - beta2**t)).sqrt() + eps, value=-lr / (1 - beta1**t))


@pytest.mark.parametrize("mode", ["decoupled", "gradient", "second-moment"])
def test_fused_decay_step_equals_the_unfused_equations(mode):
    torch.manual_seed(0)
    shapes = [(6, 8), (8,), (4, 12)]
    ours = [torch.randn(*s, requires_grad=True) for s in shapes]
    ref = [p.detach().clone().requires_grad_(True) for p in ours]
    kept = {0: nm_mask(ours[0].detach().abs(), 2, 4), 2: nm_mask(ours[2].detach().abs(), 2, 4)}
    groups = [{"params": [ours[0], ours[2]], "weight_decay": 0.1}, {"params": [ours[1]], "weight_decay": 0.0}]
    opt = AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    lam = {"value": 0.0}
    opt.set_decay({ours[i]: (lambda k=k: k) for i, k in kept.items()}, lambda: lam["value"], mode)
    states = [{} for _ in ref]
    for step in range(6):
        lam["value"] = 0.3 * step
        grads = [torch.randn(*s) for s in shapes]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        for i, q in enumerate(ref):
            _reference_step(q, states[i], 1e-2, (0.9, 0.95), 1e-8, 0.0 if i == 1 else 0.1, kept.get(i), lam["value"], mode)
    for p, q in zip(ours, ref):
        assert torch.allclose(p, q, atol=1e-6)


def test_slorb_mean_init_restores_dense_output_for_group_constant_inputs():
    torch.manual_seed(0)
    k, out, width = 4, 6, 16
    W = torch.randn(out, width)
    mask = nm_mask(W.abs(), 2, 4)
    path = slorb.SLoRB(out, width, k, train_x=False)
    path.S.data.copy_(slorb.mean_init(W, mask, k))
    x = torch.randn(3, width // k).repeat_interleave(k, dim=1)  # equal within each group of k
    assert torch.allclose(x @ (W * mask).T + path(x), x @ W.T, atol=1e-5)
    y = torch.randn(3, width)  # in general it is only an approximation
    assert not torch.allclose(y @ (W * mask).T + path(y), y @ W.T, atol=1e-3)
    trainable = slorb.SLoRB(out, width, k, train_x=True)
    trainable.S.data.copy_(path.S)
    assert torch.allclose(trainable(y), path(y), atol=1e-6)  # X starts as the grouping matrix


def test_kd_loss():
    torch.manual_seed(0)
    t = torch.randn(2, 5, 11)
    assert kd_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(2, 5, 11)
    p_t, p_s = (t / 2).softmax(-1), (s / 2).softmax(-1)
    manual = (p_t * (p_t.log() - p_s.log())).sum(-1).mean() * 4
    assert kd_loss(s, t, 2.0, "forward").item() == pytest.approx(manual.item(), rel=1e-5)
    manual_rev = (p_s * (p_s.log() - p_t.log())).sum(-1).mean() * 4
    assert kd_loss(s, t, 2.0, "reverse").item() == pytest.approx(manual_rev.item(), rel=1e-5)


def test_conv1d_masks_run_along_inputs():
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(4, 8)  # weight stored (in=8, out=4)
    mask = masked.magnitude_nm_mask(layer, 2, 4)
    assert mask.shape == (8, 4) and is_valid_nm(mask.t().float(), 2, 4)
