"""Block-wise sparse reconstruction (`slimlm prune --reconstruct`) on tiny models of real architectures."""
import importlib
import json

import pytest
import torch

from conftest import build_model
from slimlm import models
from slimlm.cli import main
from slimlm.data import calibration_windows, load_tokens
from slimlm.errors import SlimlmError
from slimlm.ops.sparsity import is_valid_nm, parse_sparsity
from slimlm.prune import prune
from slimlm.prune.reconstruct import Reconstruction

rc_module = importlib.import_module("slimlm.prune.reconstruct")  # the package exports a function of that name


def windows_for(text_file, tokenizer, n=8, seqlen=64):
    return calibration_windows(load_tokens(tokenizer, str(text_file)), n, seqlen, seed=0)


def output_error(model, dense, windows) -> float:
    """Relative error of the last hidden states against the dense model's, over the windows."""
    with torch.no_grad():
        a = model(input_ids=windows, output_hidden_states=True).hidden_states[-1]
        b = dense(input_ids=windows, output_hidden_states=True).hidden_states[-1]
    return float((a - b).square().sum() / b.square().sum())


@pytest.mark.parametrize("arch,method,sparsity,mask", [
    ("llama", "wanda", "2:4", "fixed"), ("llama", "sparsegpt", "2:4", "adaptive"), ("gpt2", "wanda", "2:4", "fixed"),
    ("opt", "sparsegpt", "0.5", "fixed"),
])
def test_reconstruction_beats_the_one_shot_start_and_keeps_the_pattern(arch, method, sparsity, mask, tokenizer, text_file):
    windows = windows_for(text_file, tokenizer)
    sp = parse_sparsity(sparsity)
    dense = build_model(arch)
    one_shot, rebuilt = build_model(arch), build_model(arch)
    prune(one_shot, models.find_targets(one_shot), method, sp, windows)
    records = prune(rebuilt, models.find_targets(rebuilt), method, sp, windows,
                    reconstruction=Reconstruction(steps=30, batch=4, lr=1e-3, mask=mask))
    assert all(r["error_after"] < r["error_before"] for r in records)
    assert output_error(rebuilt, dense, windows) < output_error(one_shot, dense, windows)
    for name, module in models.find_targets(rebuilt).items():
        W = models.weight_matrix(module)
        if sp.is_nm:
            assert is_valid_nm(W, 2, 4), name
        else:
            assert abs(float((W == 0).float().mean()) - 0.5) < 0.01, name


def test_only_the_block_being_trained_gets_gradients(tokenizer, text_file, monkeypatch):
    """Memory stays bounded by one block: nothing outside the block under training takes part in backward."""
    model = build_model("llama")
    blocks = models.find_blocks(model)[1]
    seen = []
    original = rc_module.train_block

    def spy(block, *args, **kw):
        result = original(block, *args, **kw)
        others = [p.grad for b in blocks if b is not block for p in b.parameters()]
        seen.append(all(g is None for g in others) and all(p.grad is None for p in model.get_input_embeddings().parameters()))
        return result

    monkeypatch.setattr(rc_module, "train_block", spy)
    prune(model, models.find_targets(model), "wanda", parse_sparsity("2:4"), windows_for(text_file, tokenizer),
          reconstruction=Reconstruction(steps=3, batch=2))
    assert seen == [True, True]


def test_a_killed_run_resumes_after_its_last_finished_block(model_dirs, text_file, tmp_path, monkeypatch):
    args = ["prune", "--model", str(model_dirs["llama"]), "--method", "wanda", "--calib", str(text_file), "--nsamples",
            "6", "--seqlen", "32", "--reconstruct", "--reconstruct-steps", "4", "--reconstruct-batch", "2"]
    assert main(args + ["--output", str(tmp_path / "whole")]) == 0
    original, calls = rc_module.train_block, []

    def dies_on_the_second_block(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*a, **kw)

    monkeypatch.setattr(rc_module, "train_block", dies_on_the_second_block)
    out = tmp_path / "resumed"
    assert main(args + ["--output", str(out)]) == 130
    assert not out.exists() and (tmp_path / "resumed.checkpoints" / "block-0.safetensors").is_file()
    monkeypatch.setattr(rc_module, "train_block", original)
    assert main(args + ["--output", str(out)]) == 0
    assert not (tmp_path / "resumed.checkpoints").exists()  # removed once published
    whole, resumed = models.load(str(tmp_path / "whole")).model, models.load(str(out)).model
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    report = json.loads((out / "report.json").read_text())["reconstruction"]
    assert [b["block"] for b in report["blocks"]] == [0, 1] and report["mean_error_after"] < report["mean_error_before"]
    assert "Then each block was trained for 4 steps" in (out / "README.md").read_text()


def test_a_resume_with_other_settings_is_refused(model_dirs, text_file, tmp_path, capsys):
    folder = tmp_path / "o.checkpoints"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({"blocks": 1, "records": [], "identity": {"seed": 5}}))
    rc = main(["prune", "--model", str(model_dirs["llama"]), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
               "--reconstruct", "--output", str(tmp_path / "o")])
    assert rc == 2 and "holds a reconstruction of other settings (" in capsys.readouterr().err


def test_bad_reconstruction_settings_are_one_line_errors(model_dirs, text_file, tmp_path, capsys):
    base = ["prune", "--model", str(model_dirs["llama"]), "--output", str(tmp_path / "o"), "--reconstruct"]
    assert main(base + ["--method", "magnitude"]) == 2
    assert "needs calibration data" in capsys.readouterr().err
    assert main(base + ["--calib", str(text_file), "--nsamples", "2", "--seqlen", "32", "--reconstruct-batch", "4"]) == 2
    assert "--reconstruct-batch 4 is more than the 2 calibration windows" in capsys.readouterr().err
    with pytest.raises(SlimlmError, match="at least 1 step"):
        Reconstruction(steps=0).check(4)


def test_a_block_that_trains_worse_keeps_its_one_shot_weights(tokenizer, text_file):
    windows = windows_for(text_file, tokenizer)
    sp = parse_sparsity("2:4")
    one_shot, rebuilt = build_model("llama"), build_model("llama")
    prune(one_shot, models.find_targets(one_shot), "wanda", sp, windows)
    records = prune(rebuilt, models.find_targets(rebuilt), "wanda", sp, windows,
                    reconstruction=Reconstruction(steps=4, batch=2, lr=10.0))  # far too large: training diverges
    assert all(r["kept"] == "one-shot" and r["trained_error"] > r["error_before"] == r["error_after"] for r in records)
    assert all(torch.equal(a, b) for a, b in zip(one_shot.state_dict().values(), rebuilt.state_dict().values()))
