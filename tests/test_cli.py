import json
import subprocess
import sys

import pytest
import transformers

from conftest import build_model
from slimlm.cli import main
from slimlm.models import find_targets, weight_matrix
from slimlm.ops.sparsity import is_valid_nm


def prune_args(model, text, out, *extra):
    return ["prune", "--model", str(model), "--calib", str(text), "--nsamples", "4", "--seqlen", "64",
            "--output", str(out), *extra]


def test_prune_writes_a_checked_hf_folder(model_dirs, text_file, tmp_path, capsys):
    out = tmp_path / "pruned"
    rc = main(prune_args(model_dirs["llama"], text_file, out, "--method", "sparsegpt", "--eval", str(text_file),
                         "--eval-dense", "--eval-windows", "3"))
    assert rc == 0
    assert "pruning blocks" in capsys.readouterr().err
    for name in ("model.safetensors", "config.json", "tokenizer.json", "report.json", "README.md", "slimlm.yaml"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".pruned.tmp-*"))
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "sparsegpt" and report["sparsity"] == "2:4"
    assert report["reload_check"]["max_abs_output_diff"] <= 1e-5
    assert all(layer["valid_2_4"] and layer["sparsity"] == 0.5 for layer in report["layers"])
    assert report["evaluation"]["pruned"]["perplexity"] > 0 and report["evaluation"]["dense"]["windows"] == 3
    assert {"torch", "transformers", "slimlm"} <= set(report["versions"])

    # plain transformers loads it, and `slimlm eval` on it reproduces the reported perplexity
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert all(is_valid_nm(weight_matrix(m), 2, 4) for m in find_targets(model).values())
    result = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out), "--data", str(text_file), "--seqlen", "64", "--max-windows", "3",
                 "--json", str(result)]) == 0
    ev = json.loads(result.read_text())
    assert ev["perplexity"] == pytest.approx(report["evaluation"]["pruned"]["perplexity"], rel=1e-6)
    assert ev["windows"] == 3 and ev["seqlen"] == 64 and "bos_added" in ev


@pytest.mark.parametrize("arch,method", [("gpt2", "wanda"), ("opt", "sparsegpt"), ("bert", "wanda")])
def test_prune_other_architectures(model_dirs, text_file, tmp_path, arch, method):
    out = tmp_path / arch
    assert main(prune_args(model_dirs[arch], text_file, out, "--method", method, "--sparsity", "4:8")) == 0
    cls = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(out)
    targets = find_targets(model)
    assert targets and all(is_valid_nm(weight_matrix(m), 4, 8) for m in targets.values())


def test_inspect_reports_every_field(model_dirs, text_file, tmp_path):
    out = tmp_path / "mag"
    assert main(prune_args(model_dirs["llama"], text_file, out, "--method", "magnitude", "--sparsity", "0.5")) == 0
    js = tmp_path / "inspect.json"
    assert main(["inspect", str(out), "--json", str(js)]) == 0
    info = json.loads(js.read_text())
    assert len(info["layers"]) == 14
    for layer in info["layers"]:
        assert set(layer) == {"name", "shape", "stored", "sparsity", "valid_2_4", "valid_4_8", "rank", "effective_rank"}
        assert layer["sparsity"] == pytest.approx(0.5, abs=0.01)
        assert layer["stored"] == round(layer["shape"][0] * layer["shape"][1] * (1 - layer["sparsity"]))
        assert 1 <= layer["effective_rank"] <= layer["rank"] <= min(layer["shape"])
    t = info["totals"]
    assert t["target_nonzero"] == pytest.approx(t["target_parameters"] / 2, rel=0.01)


@pytest.fixture(scope="module")
def indivisible_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("odd")
    build_model("llama", intermediate=66).save_pretrained(folder)  # down_proj input width 66
    tokenizer.save_pretrained(folder)
    return folder


def test_indivisible_layer_is_named_and_can_be_skipped(indivisible_dir, text_file, tmp_path, capsys):
    out = tmp_path / "odd-out"
    assert main(prune_args(indivisible_dir, text_file, out)) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.down_proj" in err and "--skip-indivisible" in err
    assert not out.exists()
    assert main(prune_args(indivisible_dir, text_file, out, "--skip-indivisible")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_layers"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def _bad_cases(model_dirs, text_file, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short for a window.")
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    llama = model_dirs["llama"]
    return {
        "unknown model": (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        "missing folder": (["--model", str(tmp_path / "nowhere.gguf")], "GGUF file not found"),
        "sparsity 3:2": (["--model", str(llama), "--sparsity", "3:2"], "malformed sparsity '3:2'"),
        "sparsity 2:0": (["--model", str(llama), "--sparsity", "2:0"], "malformed sparsity '2:0'"),
        "sparsity 1.5": (["--model", str(llama), "--sparsity", "1.5"], "malformed sparsity '1.5'"),
        "short data": (["--model", str(llama), "--calib", str(short)], "too few for one window"),
        "empty data": (["--model", str(llama), "--calib", str(empty)], "is empty"),
        "missing data": (["--model", str(llama), "--calib", str(tmp_path / "none.txt")], "data not found"),
    }


CASES = ["unknown model", "missing folder", "sparsity 3:2", "sparsity 2:0", "sparsity 1.5", "short data",
         "empty data", "missing data"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_clear_line(case, model_dirs, text_file, tmp_path, capsys):
    args, message = _bad_cases(model_dirs, text_file, tmp_path)[case]
    out = tmp_path / "out"
    base = ["prune", "--calib", str(text_file), "--nsamples", "2", "--seqlen", "64", "--output", str(out)]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_existing_output_needs_overwrite(model_dirs, text_file, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = prune_args(model_dirs["llama"], text_file, out, "--method", "magnitude")
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").exists()
    # --overwrite replaces only what slimlm wrote: a folder of the user's own stays (issue 17)
    assert main(args + ["--overwrite"]) == 2
    assert "not a slimlm output" in capsys.readouterr().err and (out / "keep.txt").exists()
    (out / "report.json").write_text("{}")
    assert main(args + ["--overwrite"]) == 0
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()


def test_failure_during_publish_leaves_nothing(model_dirs, text_file, tmp_path, monkeypatch, capsys):
    """A crash after the weights were written (here: in the reload check) removes the temporary folder
    (and the output's lock); the error is one line saying it is unexpected, --debug shows the traceback."""
    import slimlm.output

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(slimlm.output, "_verify", broken)
    monkeypatch.delenv("SLIMLM_DEBUG", raising=False)
    out = tmp_path / "crash"
    assert main(prune_args(model_dirs["llama"], text_file, out, "--method", "magnitude")) == 1
    err = capsys.readouterr().err
    assert "error: unexpected RuntimeError: disk full (run again with --debug" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert main(prune_args(model_dirs["llama"], text_file, out, "--method", "magnitude") + ["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_command_line_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "slimlm", "prune", "--model", "no-such-model", "--output",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("slimlm prune: error: unknown model 'no-such-model': not a built-in name "
                                   "(smollm2-135m, minilm-l6), a model folder, a .gguf file or a hub id (org/name)")


def test_unknown_method_is_refused_by_the_parser(model_dirs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--model", str(model_dirs["llama"]), "--method", "obs", "--output", "x"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'obs'" in capsys.readouterr().err


def test_version_names_slimlm_torch_and_transformers(capsys):
    import torch

    import slimlm

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == (f"slimlm {slimlm.__version__} (torch {torch.__version__}, "
                                               f"transformers {transformers.__version__})")


def test_top_level_help_imports_no_command_and_a_command_help_shows_its_options():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = ("import sys\nfrom slimlm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
              "print(sorted(m for m in ('torch', 'transformers', 'slimlm.commands.train') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("[]")  # nothing heavy imported
    for name in ("prune", "finetune", "train", "quantize", "eval", "inspect", "report", "bench", "demo"):
        assert f"\n    {name} " in proc.stdout
    assert "(90% energy)" in proc.stdout  # the inspect line of the command list
    proc = subprocess.run([sys.executable, "-m", "slimlm", "prune", "--help"], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0 and "--sparsity" in proc.stdout and "--calib" in proc.stdout


def test_inspect_help_shows_a_plain_percent(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    out = capsys.readouterr().out
    assert "(90% energy)" in out and "%%" not in out
