"""`slimlm bench` on tiny LLaMAs: rows for every layer shape and batch, the kernels compute what the
compressed model computes, and the 2:4 semi-structured path refuses CPUs clearly. Timings are only
checked to be positive: speed goals live in docs/benchmarks.md, never in tests."""
import json

import pytest
import torch

import slimlm
from slimlm.runtime import bench, kernels
from slimlm.ops import quant
from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.ops.factorized import LowRankLinear, replace_module
from slimlm.models import find_targets, weight_matrix

SMALL = {"batch_sizes": [1, 2], "seqlens": [8], "layer_batches": [1, 8], "decode_tokens": 2, "repeats": 2,
         "min_layer_seconds": 0.001}


@pytest.fixture(scope="module")
def sparse_dir(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "sparse"
    assert main(["prune", "--model", str(model_dirs["llama"]), "--method", "magnitude", "--sparsity", "2:4",
                 "--output", str(out)]) == 0
    return out


def quantized_dir(sparse_dir, tmp_path, bits, group):
    out = tmp_path / f"int{bits}-g{group}"
    assert main(["quantize", "--model", str(sparse_dir), "--bits", str(bits), "--group-size", str(group),
                 "--method", "rtn", "--output", str(out)]) == 0
    return out


def test_bench_of_a_24_model_on_cpu_has_a_row_per_shape_and_batch(sparse_dir, model_dirs):
    result = bench.run(bench.resolve_settings(model=str(sparse_dir), dense=str(model_dirs["llama"]), **SMALL))
    model = slimlm.load(str(sparse_dir))
    shapes = {tuple(weight_matrix(m).shape) for m in find_targets(model).values()}
    layer_rows = [r for r in result["rows"] if r["row"] == "layer"]
    assert {(tuple(r["shape"]), r["batch"]) for r in layer_rows} == {(s, b) for s in shapes for b in (1, 8)}
    assert sum(r["layers"] for r in layer_rows) == 2 * len(find_targets(model))  # every layer counted once per batch
    for row in layer_rows:
        assert row["kind"] == "2:4" and "no 2:4 kernel on CPU" in row["backend"]
        assert row["dense_seconds"] > 0 and row["compressed_seconds"] > 0 and row["speedup"] > 0
        unclear = row["speedup_min"] < 1 < row["speedup_max"]
        assert row["verdict"].startswith("no clear difference" if unclear else "faster" if row["speedup"] >= 1
                                         else "slower than dense")
    phases = {(r["row"], r["batch"]) for r in result["rows"] if r["row"] != "layer"}
    assert phases == {(p, b) for p in ("prefill", "decode") for b in (1, 2)}
    decode = next(r for r in result["rows"] if r["row"] == "decode" and r["batch"] == 2)
    assert decode["tokens"] == 4 and decode["dense_tokens_per_s"] > 0
    assert result["kernel_check_max_abs_logit_diff"] == 0.0  # on CPU the 2:4 layers run as they are
    assert result["memory_measure"].startswith("CPU")


def test_semi_structured_path_refuses_cpu_clearly(sparse_dir, model_dirs):
    W = torch.zeros(64, 64)
    W[:, ::2] = 1.0
    with pytest.raises(SlimlmError, match="only on a CUDA GPU"):
        kernels.to_semi_structured(W, "model.layers.0.mlp.up_proj")
    with pytest.raises(SlimlmError, match="needs a CUDA GPU"):
        bench.run(bench.resolve_settings(model=str(sparse_dir), dense=str(model_dirs["llama"]),
                                         sparse_kernel="semi-structured", **SMALL))


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64)])
def test_int_kernels_compute_the_dequantized_layer(bits, group):
    torch.manual_seed(0)
    W, bias, x = torch.randn(48, 128), torch.randn(48), torch.randn(2, 5, 128)
    codes, scales = quant.rtn(W, bits, group)
    reference = torch.nn.functional.linear(x, quant.dequantize(codes, scales, group), bias)
    layer = (kernels.Int8WeightLinear(codes, scales, bias, torch.float32) if bits == 8
             else kernels.Int4WeightLinear(codes, scales, group, bias, torch.float32))
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)


def test_bench_of_quantized_models_uses_the_int_kernels(sparse_dir, model_dirs, tmp_path):
    for bits, group, expected in ((8, -1, "_weight_int8pack_mm"), (4, 32, "_weight_int4pack_mm_for_cpu"),
                                  (8, 16, "no stock kernel for group-wise int8")):
        folder = quantized_dir(sparse_dir, tmp_path, bits, group)
        result = bench.run(bench.resolve_settings(model=str(folder), dense=str(model_dirs["llama"]), **SMALL))
        assert {layer["kind"] for layer in result["layers"]} == {f"2:4+int{bits}"}
        assert all(expected in layer["backend"] for layer in result["layers"])
        assert result["kernel_check_max_abs_logit_diff"] < 1e-4  # the kernels compute the loaded model
        assert result["weights_bytes"]["compressed"] < result["weights_bytes"]["dense"] or group == 16


def test_bench_of_a_low_rank_model(model_dirs, tokenizer, tmp_path):
    model = slimlm.load(str(model_dirs["llama"]))
    ranks = {}
    for name, module in find_targets(model).items():
        U, S, Vh = torch.linalg.svd(weight_matrix(module).detach(), full_matrices=False)
        replace_module(model, name, LowRankLinear.from_factors(U[:, :4] * S[:4], Vh[:4], None))
        ranks[name] = 4
    model.config.slimlm_lowrank = ranks
    model.save_pretrained(tmp_path / "lowrank")
    tokenizer.save_pretrained(tmp_path / "lowrank")
    result = bench.run(bench.resolve_settings(model=str(tmp_path / "lowrank"), dense=str(model_dirs["llama"]),
                                              **{**SMALL, "whole_model": False}))
    assert {r["kind"] for r in result["rows"]} == {"low-rank r=4"}
    assert all("two thin matmuls" in r["backend"] for r in result["rows"])
    assert result["weights_bytes"]["compressed"] < result["weights_bytes"]["dense"]


def test_bench_cli_writes_json_and_plot_and_says_when_slower(sparse_dir, model_dirs, tmp_path, capsys):
    args = ["bench", "--model", str(sparse_dir), "--dense", str(model_dirs["llama"]), "--batch-sizes", "1",
            "--seqlens", "8", "--layer-batches", "1,4", "--decode-tokens", "1", "--repeats", "2",
            "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "b.json").read_text())
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    for row in result["rows"]:
        assert row["verdict"] in printed
    assert ("SLOWER than dense" in printed) == any(bench.clearly_slower(r) for r in result["rows"])
    assert bench.verdict(0.834) == "slower than dense: 0.83×" and bench.verdict(1.5) == "faster: 1.50×"
    assert bench.verdict(0.834, 0.8, 0.9) == "slower than dense: 0.83×"
    assert bench.verdict(1.01, 0.9, 1.1) == "no clear difference: 1.01× (0.90–1.10)"


def test_bench_errors_name_the_problem(sparse_dir, model_dirs, tmp_path, capsys):
    assert main(["bench", "--model", str(sparse_dir), "--dense", str(model_dirs["llama"]), "--batch-sizes", "1,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["bench", "--model", str(sparse_dir), "--dense", str(model_dirs["gpt2"]), "--no-model"]) == 2
    assert "--dense" in capsys.readouterr().err
    assert main(["bench", "--model", str(sparse_dir), "--dense", str(model_dirs["llama"]),
                 "--json", str(tmp_path / "missing" / "b.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_plot_has_plain_ticks_and_the_repeats_range():
    def layer(batch, speedup, low, high):
        return {"row": "layer", "shape": [64, 32], "kind": "2:4+int4", "batch": batch, "speedup": speedup,
                "speedup_min": low, "speedup_max": high}

    rows = [layer(1, 0.1, 0.08, 0.12), layer(16, 0.02, 0.015, 0.03), layer(512, 0.014, 0.012, 0.016),
            {"row": "prefill", "seqlen": 32, "batch": 1, "speedup": 0.45, "speedup_min": 0.42, "speedup_max": 0.5}]
    result = {"rows": rows, "model": "m", "dense": "d", "device": "cpu", "settings": {"repeats": 5}}
    fig = bench.figure(result)
    layers, whole = fig.axes
    fig.canvas.draw()
    ticks = [t.get_text() for t in layers.get_yticklabels() if t.get_text()]
    assert ticks == ["0.01×", "0.02×", "0.05×", "0.1×", "0.2×", "0.5×", "1×"]  # 1×, the dense line, in view
    assert [t.get_text() for t in layers.get_xticklabels()] == ["1", "16", "512"]
    (bars,) = layers.containers  # one line: one layer shape
    segments = bars.lines[2][0].get_segments()
    assert [(round(s[0][1], 3), round(s[1][1], 3)) for s in segments] == [(0.08, 0.12), (0.015, 0.03), (0.012, 0.016)]
    assert "min–max of 5 repeats" in layers.get_title()
    assert [t.get_text() for t in whole.get_xticklabels()] == ["1"]
    # a result with only whole-model rows gets one panel, not an empty one
    assert len(bench.figure({**result, "rows": rows[3:]}).axes) == 1
