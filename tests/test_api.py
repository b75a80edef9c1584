"""The Python API on tiny models: slimlm.oneshot gives bitwise the weights of `slimlm prune`;
slimlm.factorize with each initialisation; slimlm.load(..., runtime=True) computes what the plain load
computes, with quantized weights held as packed codes."""
import json

import pytest
import torch
import transformers
from conftest import assert_transformers_refuses, build_model, tiny_config

import slimlm
from slimlm import api, data
from slimlm.runtime import kernels
from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.ops.factorized import LowRankLinear
from slimlm.ops.lowrank import rank_for_budget
from slimlm.models import find_targets, weight_matrix

CALIB = {"nsamples": 4, "seqlen": 32}


def probe_logits(model, seed=0, length=24):
    ids = torch.randint(model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()


@pytest.mark.parametrize("arch,method,calib", [("llama", "wanda", "texts"), ("llama", "sparsegpt", "windows"),
                                               ("gpt2", "wanda", "path"), ("opt", "magnitude", None)])
def test_oneshot_on_an_in_memory_model_equals_slimlm_prune(arch, method, calib, model_dirs, text_file, tokenizer,
                                                            tmp_path):
    options = ["--calib", str(text_file), "--nsamples", "4", "--seqlen", "32"] if calib else []
    out = tmp_path / "cli"
    assert main(["prune", "--model", str(model_dirs[arch]), "--method", method, "--sparsity", "2:4",
                 "--output", str(out), *options]) == 0
    expected = slimlm.load(str(out)).state_dict()

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs[arch])  # the user's own model
    given = {"texts": [text_file.read_text()], "path": str(text_file), None: None,
             "windows": data.calibration_windows(data.load_tokens(tokenizer, str(text_file), split="train"),
                                                 4, 32, 0)}[calib]
    report = slimlm.oneshot(model, tokenizer, method=method, sparsity="2:4", calib=given, **CALIB)

    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)  # bitwise
    cli_report = json.loads((out / "report.json").read_text())
    for key in ("method", "sparsity", "totals", "layers", "skipped_layers"):
        assert report[key] == cli_report[key], key
    assert report["totals"]["target_sparsity"] == pytest.approx(0.5, abs=1e-3)
    if calib:
        assert report["calibration"]["windows"] == 4 and report["calibration"]["seqlen"] == 32
        assert report["calibration"]["data"] == {"texts": "1 text", "path": str(text_file),
                                                 "windows": "token windows"}[calib]
    else:
        assert report["calibration"] is None


def test_oneshot_errors_say_what_to_pass(tokenizer):
    model = build_model("llama")
    with pytest.raises(SlimlmError, match="needs calibration data: pass calib="):
        slimlm.oneshot(model, tokenizer, method="wanda")
    with pytest.raises(SlimlmError, match="pass tokenizer="):
        slimlm.oneshot(model, method="sparsegpt", calib=["some text"])
    with pytest.raises(SlimlmError, match="2-D integer tensor"):
        slimlm.oneshot(model, method="wanda", calib=torch.randn(2, 8))
    with pytest.raises(SlimlmError, match="unknown method"):
        slimlm.oneshot(model, method="random")
    assert all(bool((weight_matrix(m) != 0).all()) for m in find_targets(model).values())  # nothing pruned


def test_factorize_svd_reproduces_a_low_rank_layer_exactly():
    model = build_model("llama")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in find_targets(model).values():
            W = weight_matrix(module)
            W.copy_(torch.randn(W.shape[0], 3, generator=gen) @ torch.randn(3, W.shape[1], generator=gen) / 4)
    before = probe_logits(model)
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in find_targets(model).items()}

    ranks = slimlm.factorize(model, keep=0.5, init="svd")

    assert ranks.keys() == shapes.keys() and model.config.slimlm_lowrank == ranks
    for name, (out_f, in_f) in shapes.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankLinear) and layer.rank == ranks[name] == rank_for_budget(out_f, in_f, 0.5)
        assert (layer.out_features, layer.in_features) == (out_f, in_f)
        assert layer.rank * (out_f + in_f) <= 0.5 * out_f * in_f  # the parameter budget
    after = probe_logits(model)
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # rank 3 <= every layer's rank: exact


def test_factorize_fisher_fits_the_rows_the_loss_cares_about(tokenizer, text_file):
    base = build_model("llama")
    with pytest.raises(SlimlmError, match="init='fisher' needs data"):
        slimlm.factorize(base, init="fisher")
    targets = find_targets(base)
    windows = data.calibration_windows(data.load_tokens(tokenizer, str(text_file), split="train"), 4, 32, 0)
    base.train()
    fisher = api._fisher(base, targets, [{"input_ids": w[None], "labels": w[None]} for w in windows])
    assert base.training and all(p.requires_grad for p in base.parameters())  # restored
    weights = {n: weight_matrix(m).detach().clone() for n, m in targets.items()}

    errors = {}
    for init in ("svd", "fisher"):
        model = build_model("llama")
        slimlm.factorize(model, keep=0.25, init=init, data=windows if init == "fisher" else None)
        errors[init] = sum(float((fisher[n].sum(1) * ((weights[n] - model.get_submodule(n).merged_weight().detach()) ** 2)
                                  .sum(1)).sum()) for n in targets)
    assert errors["fisher"] < errors["svd"]  # the Fisher-weighted error is what init='fisher' minimises

    model = build_model("llama")
    ranks = slimlm.factorize(model, keep=0.25, init="fisher", data=[text_file.read_text()], tokenizer=tokenizer,
                             nsamples=2, seqlen=32)
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in ranks)
    assert probe_logits(model).shape == (2, 24, model.config.vocab_size)


def test_factorize_fisher_of_a_classifier_takes_labeled_batches():
    config = tiny_config("bert")
    config.num_labels = 3
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(config.vocab_size, (4, 16), generator=gen),
                "attention_mask": torch.ones(4, 16, dtype=torch.long),
                "labels": torch.randint(3, (4,), generator=gen)} for _ in range(2)]
    ranks = slimlm.factorize(model, keep=0.3, init="fisher", data=batches)
    assert ranks and all(isinstance(model.get_submodule(n), LowRankLinear) for n in ranks)
    assert model(**batches[0]).logits.shape == (4, 3)
    with pytest.raises(SlimlmError, match="computed no loss"):
        slimlm.factorize(build_model("bert"), init="fisher", data=batches)


def test_factorize_sparsity_aware_needs_a_pruned_model(tokenizer, text_file):
    model = build_model("llama")
    with pytest.raises(SlimlmError, match="has no zero weights: prune first"):
        slimlm.factorize(model, init="sparsity-aware")
    slimlm.oneshot(model, method="magnitude", sparsity="2:4")
    pruned = {n: weight_matrix(m).detach().clone() for n, m in find_targets(model).items()}

    results = {}
    for how, options in {"|W|": {}, "wanda": {"data": ["x " + text_file.read_text()], "tokenizer": tokenizer,
                                               "nsamples": 2, "seqlen": 32},
                         "given": {"scores": {n: torch.ones_like(w) for n, w in pruned.items()}}}.items():
        copy = build_model("llama")
        copy.load_state_dict(model.state_dict())
        ranks = slimlm.factorize(copy, keep=0.25, init="sparsity-aware", **options)
        results[how] = {n: copy.get_submodule(n).merged_weight().detach() for n in ranks}
    plain = build_model("llama")
    plain.load_state_dict(model.state_dict())
    slimlm.factorize(plain, keep=0.25, init="svd")
    for name, W in pruned.items():
        kept = W != 0
        svd_error = float(((W - plain.get_submodule(name).merged_weight().detach())[kept] ** 2).sum())
        # equal scores: the weighted fit of the kept entries alone fits them better than the SVD of W
        assert float(((W - results["given"][name])[kept] ** 2).sum()) < svd_error
        assert not torch.allclose(results["|W|"][name], results["wanda"][name])  # the scores matter
    with pytest.raises(SlimlmError, match="no entry for layer"):
        slimlm.factorize(model, init="sparsity-aware", scores={})


# ---------------------------------------------------------------------------------------------
# slimlm.load(..., runtime=True)

@pytest.fixture(scope="module")
def folders(model_dirs, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("api-load")
    llama = str(model_dirs["llama"])
    assert main(["prune", "--model", llama, "--method", "magnitude", "--output", str(root / "2of4")]) == 0
    for name, bits, group in (("int8", "8", "-1"), ("int4", "4", "32")):
        assert main(["quantize", "--model", llama, "--bits", bits, "--group-size", group, "--method", "rtn",
                     "--output", str(root / name)]) == 0
    model = slimlm.load(llama)
    slimlm.factorize(model, keep=0.5)
    slimlm.save(model, root / "lowrank", tokenizer)
    return {name: root / name for name in ("2of4", "int8", "int4", "lowrank")}


# format: (max |logit difference| allowed, what the backend names, weight memory smaller than the plain load)
FORMATS = {"2of4": (0.0, "no 2:4 kernel on CPU", False), "int8": (1e-4, "_weight_int8pack_mm", True),
           "int4": (1e-4, "_weight_int4pack_mm_for_cpu", True), "lowrank": (0.0, "two thin matmuls", False)}


@pytest.mark.parametrize("fmt", FORMATS)
def test_runtime_load_gives_the_logits_of_the_plain_load(fmt, folders):
    tolerance, backend, smaller = FORMATS[fmt]
    plain = slimlm.load(str(folders[fmt]))
    fast = slimlm.load(str(folders[fmt]), runtime=True)
    diff = (probe_logits(fast) - probe_logits(plain)).abs().max().item()
    assert diff <= tolerance, diff
    assert len(fast.slimlm_backends) == len(find_targets(plain))
    assert all(backend in b for b in fast.slimlm_backends.values()), fast.slimlm_backends
    assert (kernels.tensor_bytes(fast) < kernels.tensor_bytes(plain)) == smaller
    if fmt == "int8":
        layer = fast.get_submodule(next(iter(fast.slimlm_backends)))
        assert layer.codes.dtype == torch.int8 and not hasattr(layer, "weight")
        with pytest.raises(SlimlmError, match="runtime kernels"):
            slimlm.save(fast, folders[fmt].parent / "again")
    if fmt == "int4":  # two 4-bit codes per byte
        name = next(iter(fast.slimlm_backends))
        layer, weight = fast.get_submodule(name), weight_matrix(plain.get_submodule(name))
        assert layer.packed.dtype == torch.uint8 and layer.packed.numel() * 2 == weight.numel()
    if fmt == "lowrank":
        assert_transformers_refuses(folders[fmt])  # slimlm.save marked it: plain transformers would randomise it
        assert slimlm.load_tokenizer(str(folders[fmt]))("Hello").input_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured 2:4 kernels need a CUDA GPU")
def test_runtime_load_of_a_24_model_on_cuda(folders):
    plain = slimlm.load(str(folders["2of4"]), dtype="float16", device="cuda")
    fast = slimlm.load(str(folders["2of4"]), dtype="float16", device="cuda", runtime=True)
    torch.testing.assert_close(probe_logits(fast), probe_logits(plain), rtol=1e-2, atol=1e-2)
    # tiny layers may be refused by the kernel: then they say why and stay dense
    assert all("2:4" in b for b in fast.slimlm_backends.values()), fast.slimlm_backends


def test_factorize_activation_fits_each_layer_output_on_the_calibration_inputs(tokenizer, text_file):
    from slimlm.methods.lpaf import input_grams
    from slimlm.ops.lowrank import output_error

    with pytest.raises(SlimlmError, match="init='activation' needs data"):
        slimlm.factorize(build_model("llama"), init="activation")
    windows = data.calibration_windows(data.load_tokens(tokenizer, str(text_file), split="train"), 4, 32, 0)
    base = build_model("llama")
    targets = find_targets(base)
    grams = input_grams(base, targets, [{"input_ids": w[None]} for w in windows])
    weights = {n: weight_matrix(m).detach().clone() for n, m in targets.items()}
    errors = {}
    for init in ("svd", "activation"):
        model = build_model("llama")
        model.load_state_dict(base.state_dict())
        slimlm.factorize(model, keep=0.25, init=init, data=windows if init == "activation" else None)
        # each layer against its own inputs in the dense model (the grams above)
        errors[init] = [output_error(weights[n], model.get_submodule(n).up.weight, model.get_submodule(n).down.weight,
                                     grams[n]) for n in targets]
    # factorize measures every layer's inputs before it replaces any: the same grams, and its fit is their optimum
    assert all(a <= s * 1.0001 for a, s in zip(errors["activation"], errors["svd"]))
