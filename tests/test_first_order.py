"""First-order pruning (issue 16): learned scores through the straight-through top-k, PLATON's sensitivity
by hand, global thresholds, the run-relative schedule, and an init that approximates the layer."""
import pytest
import torch
from torch import nn

from slimlm import recipe
from slimlm.methods.movement import MovementPruning, scores_of
from slimlm.ops import masked
from slimlm.ops.first_order import global_masks, masked_by_scores, sensitivity_score, update_sensitivity
from slimlm.ops.lowrank import activation_svd, output_error, sparsity_aware_svd, truncated_svd


def test_learned_scores_get_w_times_grad_through_the_top_k_and_w_only_where_kept():
    weight = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], requires_grad=True)
    scores = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    out = masked_by_scores(weight, scores, mask)
    assert torch.equal(out, weight.detach() * mask)  # exact zeros: the forward is W * M
    upstream = torch.tensor([[1.0, 2.0, -1.0], [-1.0, -2.0, 1.0]])
    (out * upstream).sum().backward()
    assert torch.equal(scores.grad, upstream * weight.detach())  # pruned entries too: they can come back
    assert torch.equal(weight.grad, upstream * mask)


def test_sensitivity_by_hand():
    w, g = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 3.0]])
    avg, unc = torch.zeros(1, 2), torch.zeros(1, 2)
    update_sensitivity(avg, unc, w, g, beta1=0.5, beta2=0.5)
    # I = |w g| = [1, 3]; avg = 0.5 I = [0.5, 1.5]; unc = 0.5 |I - avg| = [0.25, 0.75]
    assert torch.allclose(avg, torch.tensor([[0.5, 1.5]])) and torch.allclose(unc, torch.tensor([[0.25, 0.75]]))
    update_sensitivity(avg, unc, w, torch.zeros(1, 2), beta1=0.5, beta2=0.5)
    # I = 0; avg = [0.25, 0.75]; unc = 0.5 [0.25, 0.75] + 0.5 [0.25, 0.75]
    assert torch.allclose(avg, torch.tensor([[0.25, 0.75]])) and torch.allclose(unc, torch.tensor([[0.25, 0.75]]))
    assert torch.allclose(sensitivity_score(avg, unc, True), torch.tensor([[0.0625, 0.5625]]))
    assert torch.equal(sensitivity_score(avg, unc, False), avg)


def test_sensitivity_ignores_the_sign_that_fools_the_signed_sum():
    """A large weight whose noisy gradient points 'outward' gets a negative signed score (pruned first) but
    a large sensitivity; a tiny weight stays low in both."""
    w = torch.tensor([[10.0, 0.01]])
    g = torch.tensor([[0.3, 0.3]])
    avg, unc = torch.zeros(1, 2), torch.zeros(1, 2)
    update_sensitivity(avg, unc, w, g, 0.85, 0.95)
    assert (-(w * g))[0, 0] < (-(w * g))[0, 1]
    assert avg[0, 0] > avg[0, 1]


def test_global_masks_keep_exactly_the_fraction_across_layers():
    scores = {"a": torch.tensor([[5.0, 1.0], [4.0, 0.5]]), "b": torch.tensor([[3.0, 2.0, 0.1]])}
    masks = global_masks(scores, 3 / 7)
    assert torch.equal(masks["a"], torch.tensor([[True, False], [True, False]]))
    assert torch.equal(masks["b"], torch.tensor([[True, False, False]]))


def _method(score, *extra, steps=100):
    rec = recipe.resolve("movement", ["method.distill.enabled=false", f"method.movement.score={score}",
                                      f"train.steps={steps}", *extra])
    return MovementPruning(rec, total_steps=steps)


def test_no_pruning_before_the_warm_up_ends_and_the_mask_is_fixed_at_the_end():
    hooks = _method("magnitude", "train.warmup_steps=30", "method.movement.start_fraction=0.1",
                    "method.movement.hold_fraction=0.2")
    assert hooks.start == 30 and hooks.end == 80
    keeps = [hooks.keep_fraction(s) for s in range(101)]
    assert keeps[:31] == [1.0] * 31 and keeps[80:] == [pytest.approx(0.1)] * 21
    # warm-up shorter than start_fraction: the fraction wins
    assert _method("magnitude", "train.warmup_steps=5").start == 10
    # auto warm-up scales with the run
    assert _method("magnitude", "train.warmup_steps=auto", "train.warmup_fraction=0.2", steps=1000).start == 200


def _layer_run(score, steps=20, *extra):
    torch.manual_seed(0)
    layer = nn.Linear(8, 6, bias=False)
    hooks = _method(score, "train.warmup_steps=4", "method.movement.start_fraction=0.0",
                    "method.movement.hold_fraction=0.25", "method.keep=0.25", *extra, steps=steps)

    class Trainer:
        model = nn.Sequential(layer)
        bf16 = False

    hooks.targets = {}
    hooks.cfg = {**hooks.cfg, "include": [r"^0$"], "ignore": []}
    import slimlm.models as models
    real = models.find_targets
    models.find_targets = lambda model, include, ignore: {"0": layer}
    try:
        hooks.setup(Trainer)
    finally:
        models.find_targets = real
    params = [p for p in Trainer.model.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    masks = []
    for step in range(steps):
        x = torch.randn(16, 8)
        loss = (Trainer.model(x) - x[:, :6]).pow(2).mean()
        loss.backward()
        hooks.after_backward(step)
        opt.step()
        opt.zero_grad()
        hooks.after_step(step + 1)
        masks.append(masked.get_mask(layer).clone())
    return hooks, layer, masks


@pytest.mark.parametrize("score", ["learned", "sensitivity", "magnitude"])
def test_the_mask_follows_the_schedule(score):
    hooks, layer, masks = _layer_run(score)
    for step, mask in enumerate(masks, start=1):
        assert int(mask.sum()) == 48 - int(48 * (1 - hooks.keep_fraction(step))), (step, score)
    assert all(bool(m.all()) for m in masks[:hooks.start])
    assert all(torch.equal(m, masks[hooks.end - 1]) for m in masks[hooks.end - 1:])  # fixed after the end
    if score == "learned":
        assert scores_of(layer).abs().sum() > 0  # the optimizer moved them


def test_learned_scores_get_their_own_optimizer_group_at_score_lr():
    from slimlm.train.optim import AdamW, parameter_groups
    hooks, layer, _ = _layer_run("learned", 4)
    model = nn.Sequential(layer)
    opt = AdamW(parameter_groups(model, 0.01), lr=1e-4)
    hooks.configure_optimizer(opt)
    scores = scores_of(layer)
    groups = [g for g in opt.param_groups if any(p is scores for p in g["params"])]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and len(groups[0]["params"]) == 1
    assert groups[0]["lr_scale"] == pytest.approx(1e-2 / hooks.recipe["train"]["lr"])


def _anisotropic_layer(seed=0, out=48, inp=64, tokens=2000):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    X = torch.randn(inp, tokens, generator=g) * torch.logspace(0.5, -1.5, inp)[:, None]  # real inputs are far from isotropic
    return W, X @ X.T


def test_activation_init_fits_the_layer_output_better_than_plain_svd():
    W, gram = _anisotropic_layer()
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    pruned = W * mask
    for rank in (4, 12):
        A, B = activation_svd(pruned, gram, rank)
        A0, B0 = truncated_svd(pruned, rank)
        assert output_error(pruned, A, B, gram) <= output_error(pruned, A0, B0, gram)
    # exact at full rank (up to the dampening)
    A, B = activation_svd(pruned, gram, 48, damp=1e-9)
    assert output_error(pruned, A, B, gram) < 1e-8


def test_sparsity_aware_init_with_pruned_entries_weighted_stays_close_to_the_layer():
    """Pruned entries left free (weight 0) make the factors a matrix completion: the layer's output
    drifts further from the pruned layer than outputting zero; weighting them keeps it closer."""
    W, gram = _anisotropic_layer(2)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) < 0.1
    scores = W.abs()
    pruned = W * mask
    rank = 5
    free = output_error(pruned, *sparsity_aware_svd(W, mask, scores, rank, pruned_weight=0.0), torch.eye(64))
    held = output_error(pruned, *sparsity_aware_svd(W, mask, scores, rank, pruned_weight=0.1), torch.eye(64))
    plain = output_error(pruned, *truncated_svd(pruned, rank), torch.eye(64))
    assert plain < held < 1.0 < free  # free: worse than outputting zero; held: better than that


def test_learned_scores_start_at_zero_or_at_the_normalised_magnitude():
    for init in ("zero", "magnitude"):
        hooks, layer, _ = _layer_run("learned", 8, f"method.movement.score_init={init}")
        assert scores_of(layer).shape == layer.weight.shape
    hooks = _method("learned", "method.movement.score_init=magnitude")
    w = torch.tensor([[1.0, -3.0], [0.5, 1.5]])
    assert torch.allclose(hooks._initial_scores(w, torch.zeros(2, 2)), w.abs() / 1.5)
    assert torch.equal(_method("learned")._initial_scores(w, torch.zeros(2, 2)), torch.zeros(2, 2))


def test_lpaf_sparsity_aware_init_weights_kept_entries_by_what_the_mask_was_chosen_by():
    from slimlm.methods.lpaf import lpaf_factorize
    from slimlm.methods.movement import importance
    from slimlm.ops.lowrank import rank_for_budget

    hooks, layer, _ = _layer_run("sensitivity")
    rec = recipe.resolve("lpaf", ["method.lpaf.factorization=sparsity-aware", "method.movement.score=sensitivity",
                                  "method.keep=0.5", "method.lpaf.svd_iters=3"])
    weight, mask = masked.dense_weight(layer).detach().clone(), masked.get_mask(layer).clone()
    ranked_by = importance(layer, hooks.mv)
    assert torch.equal(ranked_by, scores_of(layer) * layer.parametrizations.weight[0].uncertainty)
    layers = lpaf_factorize(nn.Sequential(layer), rec, {"0": layer}, train=None)
    A, B = sparsity_aware_svd(weight, mask, ranked_by, rank_for_budget(6, 8, 0.5), iters=3, pruned_weight=0.1)
    torch.testing.assert_close(layers["0"].lowrank.merged_weight(), A @ B)
