"""The real pretrained models that ship inside PyPI packages (slow: seconds to minutes)."""
import json

import pytest
import transformers

from slimlm.cli import main
from slimlm.models import BUILTIN_MODELS, find_targets, load, resolve, weight_matrix
from slimlm.ops.sparsity import is_valid_nm

pytestmark = pytest.mark.slow


def test_smollm2_loads_as_a_plain_llama():
    loaded = load("smollm2-135m")
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.kind == "causal-lm"
    assert not hasattr(loaded.model.config, "quantization_config")
    assert len(find_targets(loaded.model)) == 30 * 7
    # the same file given as a .gguf path
    folder, gguf = resolve("smollm2-135m")
    assert resolve(f"{folder}/{gguf}") == (folder, gguf)


def test_minilm_prunes_and_reloads(text_file, tmp_path):
    out = tmp_path / "minilm"
    assert main(["prune", "--model", "minilm-l6", "--method", "sparsegpt", "--calib", str(text_file),
                 "--nsamples", "4", "--seqlen", "128", "--output", str(out)]) == 0
    model = transformers.AutoModel.from_pretrained(out)
    targets = find_targets(model)
    assert len(targets) == 6 * 6
    assert all(is_valid_nm(weight_matrix(m), 2, 4) for m in targets.values())


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--nsamples", "4", "--seqlen", "128", "--eval-windows", "2",
                 "--reconstruct-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "wanda 2:4" in printed and "+ reconstruction" in printed
    assert "saved the reconstructed model" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"]["pruned"]["perplexity"] > report["evaluation"]["dense"]["perplexity"]
    assert all(layer["valid_2_4"] for layer in report["layers"])
    assert BUILTIN_MODELS["smollm2-135m"]["gguf_file"]
