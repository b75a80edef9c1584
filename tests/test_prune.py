import pytest
import torch

from conftest import build_model
from slimlm.errors import SlimlmError
from slimlm.models import find_targets, weight_matrix
from slimlm.prune import prune
from slimlm.prune.scores import magnitude_mask, wanda_mask
from slimlm.prune.sparsegpt import sparsegpt_prune
from slimlm.ops.sparsity import is_valid_nm, parse_sparsity, sparsity_of

ARCHS = ["llama", "gpt2", "opt", "bert"]


def calib(n=4, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 384, (n, seqlen), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sp", ["2:4", "4:8", "0.5"])
def test_every_target_layer_gets_exact_pattern(arch, method, sp):
    model = build_model(arch)
    targets = find_targets(model)
    sparsity = parse_sparsity(sp)
    before = {n: weight_matrix(m).detach().clone() for n, m in targets.items()}
    prune(model, targets, method, sparsity, calib())
    for name, module in targets.items():
        W = weight_matrix(module)
        assert sparsity_of(W) == pytest.approx(0.5, abs=1e-9 if sparsity.is_nm or method != "sparsegpt" else 0.01), name
        if sparsity.is_nm:
            assert is_valid_nm(W, sparsity.n, sparsity.m), name
        if method != "sparsegpt":  # magnitude and Wanda only remove weights, never change kept ones
            kept = W != 0
            assert torch.equal(W[kept], before[name][kept])


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_llama_style_architectures(arch):
    model = build_model(arch)
    targets = find_targets(model)
    assert len(targets) == 2 * 7
    prune(model, targets, "sparsegpt", parse_sparsity("2:4"), calib())
    assert all(is_valid_nm(weight_matrix(m), 2, 4) for m in targets.values())


def test_targets_default_to_block_linears():
    model = build_model("llama")
    names = list(find_targets(model))
    assert len(names) == 2 * 7
    assert all(n.startswith("model.layers.") for n in names)
    gpt2 = find_targets(build_model("gpt2"))
    assert set(n.split(".")[-1] for n in gpt2) == {"c_attn", "c_proj", "c_fc"}
    narrowed = find_targets(model, ignore=[r"self_attn"])
    assert len(narrowed) == 2 * 3
    with pytest.raises(SlimlmError, match="'lm_head' shares its weight with 'model.embed_tokens'"):
        find_targets(model, include=[r"^model\.layers\.", r"^lm_head$"])  # tied: pruning it would prune both
    model.config.tie_word_embeddings = False
    untied = type(model)(model.config)
    widened = find_targets(untied, include=[r"^model\.layers\.", r"^lm_head$"])
    assert "lm_head" in widened


def test_gpt2_conv1d_groups_run_along_the_input_dimension():
    model = build_model("gpt2")
    layer = model.transformer.h[0].mlp.c_proj  # Conv1D, weight stored (in=128, out=32): GPT-2 uses 4 x hidden
    assert layer.weight.shape == (128, 32)
    prune(model, {"c_proj": layer}, "magnitude", parse_sparsity("2:4"))
    assert is_valid_nm(layer.weight.t(), 2, 4)  # groups of 4 consecutive inputs per output
    assert not is_valid_nm(layer.weight, 2, 4)  # ...not along the stored rows


def heavy_tailed_inputs(n_tokens=2048, width=64, seed=0):
    """Activations with a few outlier channels, as in real LLMs (the case Wanda was made for)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.ones(width)
    scales[torch.randperm(width, generator=g)[:4]] = 20.0
    mix = torch.randn(width, width, generator=g) * 0.3 + torch.eye(width)
    return (torch.randn(n_tokens, width, generator=g) @ mix) * scales


@pytest.mark.parametrize("sp", ["2:4", "0.5"])
def test_wanda_and_sparsegpt_reconstruct_better_than_magnitude(sp):
    sparsity = parse_sparsity(sp)
    g = torch.Generator().manual_seed(1)
    W = torch.randn(48, 64, generator=g)
    X = heavy_tailed_inputs()
    ref = X @ W.T

    def err(W_pruned):
        return ((X @ W_pruned.T - ref) ** 2).sum().item()

    magnitude = err(W * magnitude_mask(W, sparsity))
    wanda = err(W * wanda_mask(W, (X**2).sum(0), sparsity))
    H = 2 * X.T @ X / 8
    sparsegpt = err(sparsegpt_prune(W, H, sparsity, blocksize=16))
    assert wanda < magnitude
    assert sparsegpt < wanda


def test_sparsegpt_update_is_what_makes_it_better():
    """With the same mask, the OBS update of the kept weights lowers the error further."""
    sparsity = parse_sparsity("2:4")
    g = torch.Generator().manual_seed(2)
    W = torch.randn(32, 64, generator=g)
    X = heavy_tailed_inputs(seed=3)
    W_sgpt = sparsegpt_prune(W, 2 * X.T @ X, sparsity)
    same_mask_no_update = W * (W_sgpt != 0)
    e_update = ((X @ (W_sgpt - W).T) ** 2).sum()
    e_plain = ((X @ (same_mask_no_update - W).T) ** 2).sum()
    assert e_update < 0.9 * e_plain


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_calibrated_methods_keep_model_outputs_closer(arch):
    windows = calib(n=8, seqlen=64)
    dense = build_model(arch)
    with torch.no_grad():
        ref = dense(input_ids=windows).logits
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        model = build_model(arch)
        prune(model, find_targets(model), method, parse_sparsity("2:4"), windows)
        with torch.no_grad():
            errors[method] = ((model(input_ids=windows).logits - ref) ** 2).mean().item()
    assert errors["sparsegpt"] < errors["magnitude"]
