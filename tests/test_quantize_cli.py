"""`slimlm quantize` end to end on a tiny 2:4 LLaMA: packed codes, exact zeros, reload, GPTQ vs RTN."""
import json

import slimlm
from conftest import assert_transformers_refuses
from slimlm.cli import main
from slimlm.models import find_targets, weight_matrix
from slimlm.ops.sparsity import is_valid_nm


def test_quantize_a_24_model_keeps_zeros_packs_and_reloads(model_dirs, text_file, tmp_path, capsys):
    sparse = tmp_path / "sparse"
    assert main(["prune", "--model", str(model_dirs["llama"]), "--method", "magnitude", "--sparsity", "2:4",
                 "--output", str(sparse)]) == 0
    capsys.readouterr()
    results = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        assert main(["quantize", "--model", str(sparse), "--bits", "4", "--group-size", "16", "--method", method,
                     "--calib", str(text_file), "--nsamples", "8", "--seqlen", "32", "--eval", str(text_file),
                     "--eval-dense", "--eval-seqlen", "32", "--eval-windows", "8", "--output", str(out)]) == 0
        progress = capsys.readouterr().err  # GPTQ's block-by-block bar says what it does
        assert ("quantizing blocks (GPTQ)" in progress) == (method == "gptq") and "pruning" not in progress
        report = json.loads((out / "report.json").read_text())
        assert set(report["layers"].values()) == {"2:4"} and report["reload_check"]["max_abs_output_diff"] <= 1e-5
        assert report["reload_check"]["nm_valid"] is True  # the packed 2:4 layers checked after the reload
        z = report["sizes"]
        assert z["stored_bytes"] < z["sparse_24_fp16_bytes"] < z["dense_fp16_bytes"]
        model = slimlm.load(str(out))
        for name, module in find_targets(model).items():
            W = weight_matrix(module)
            assert is_valid_nm(W, 2, 4)
            groups = W.detach().reshape(W.shape[0], -1, 16)  # one scale per 16 columns: at most 16 levels each
            assert max(g.unique().numel() for g in groups.reshape(-1, 16)) <= 16
        results[method] = report["evaluation"]
        config = json.loads((out / "config.json").read_text())
        assert config["slimlm_quant"]["bits"] == 4 and (out / "quant.safetensors").is_file()
        assert_transformers_refuses(out)  # it would leave the quantized layers random
        assert "library_name: slimlm" in (out / "README.md").read_text()
    before = results["rtn"]["before"]["perplexity"]
    assert results["gptq"]["quantized"]["perplexity"] <= results["rtn"]["quantized"]["perplexity"] * 1.05
    assert abs(results["rtn"]["quantized"]["perplexity"] - before) / before < 0.5


def test_quantize_errors_name_the_problem(model_dirs, tmp_path, capsys):
    assert main(["quantize", "--model", str(model_dirs["llama"]), "--group-size", "48", "--output", str(tmp_path / "a")]) == 2
    assert "not divisible by --group-size 48" in capsys.readouterr().err
    assert main(["quantize", "--model", str(model_dirs["llama"]), "--method", "gptq", "--output", str(tmp_path / "b")]) == 2
    assert "needs calibration data" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
