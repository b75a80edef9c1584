"""What a new user meets first: the device, window lengths that fit the model, dataset specs as the
messages show them, output folders colleagues can read."""
import json
import os

import pytest
import torch

from slimlm import data, devices
from slimlm.cli import main
from slimlm.errors import SlimlmError


def test_device_auto_picks_the_gpu_when_there_is_one(monkeypatch, capsys):
    assert devices.resolve("auto", announce=True) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert "device: " in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Some GPU")
    assert devices.resolve("auto", announce=True) == "cuda"
    assert "device: cuda (auto: Some GPU)" in capsys.readouterr().out


def test_unknown_or_missing_devices_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SlimlmError, match="unknown device 'foo'"):
        devices.resolve("foo")
    with pytest.raises(SlimlmError, match="no CUDA GPU is visible"):
        devices.resolve("cuda:0")
    assert devices.resolve("cpu") == "cpu"


def test_commands_default_to_auto_and_say_which_device(model_dirs, text_file, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["prune", "--model", str(model_dirs["llama"]), "--method", "magnitude", "--output", str(out)]) == 0
    assert "device: cpu (auto: no CUDA GPU visible)" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["settings"]["device"] == "cpu"


def test_windows_longer_than_the_position_table_are_refused(model_dirs, text_file, tmp_path, capsys):
    gpt2 = str(model_dirs["gpt2"])  # 512 learned positions: 2048 would end in an IndexError
    assert main(["prune", "--model", gpt2, "--calib", str(text_file), "--seqlen", "2048",
                 "--output", str(tmp_path / "a")]) == 2
    assert "--seqlen 2048 is longer than the model's position table (512 positions)" in capsys.readouterr().err
    assert main(["eval", "--model", gpt2, "--data", str(text_file), "--seqlen", "1024"]) == 2
    assert "position table (512 positions)" in capsys.readouterr().err
    rc = main(["train", "--recipe", "naive", "--output", str(tmp_path / "t"), f"model={model_dirs['llama']}",
               f"data.train={text_file}", "data.seqlen=4096"])
    assert rc == 2 and "data.seqlen 4096 is longer" in capsys.readouterr().err


def test_the_default_window_is_clamped_to_the_position_table_and_said(model_dirs, text_file, tmp_path, capsys):
    result = tmp_path / "ppl.json"
    assert main(["eval", "--model", str(model_dirs["gpt2"]), "--data", str(text_file), "--max-windows", "2",
                 "--json", str(result)]) == 0
    assert "--seqlen: 512 (the model's position table; the default is 2048)" in capsys.readouterr().out
    assert json.loads(result.read_text())["seqlen"] == 512
    out = tmp_path / "p"
    assert main(["prune", "--model", str(model_dirs["llama"]), "--calib", str(text_file), "--nsamples", "2",
                 "--output", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["calibration"]["seqlen"] == 512


class FakeDataset(dict):
    column_names = property(lambda self: list(self))

    def iter(self, batch_size):
        n = len(next(iter(self.values())))
        for i in range(0, n, batch_size):
            yield {k: v[i:i + batch_size] for k, v in self.items()}


@pytest.fixture
def hub(monkeypatch):
    """datasets.load_dataset without a hub: records what it was asked for."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return FakeDataset(text=["A first document.", "A second one."]) if name != "notext" else FakeDataset(body=["x"])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_dataset_specs_as_the_messages_show_them(hub):
    assert data.read_text("wikitext:wikitext-2-raw-v1:test") == "A first document.\n\nA second one."
    data.read_text("Salesforce/wikitext:wikitext-2-raw-v1", split="train")
    data.read_text("wikitext::validation", split="train")
    assert hub == [("wikitext", "wikitext-2-raw-v1", "test"), ("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
                   ("wikitext", None, "validation")]
    with pytest.raises(SlimlmError, match=r"has no 'text' column \(it has body\)"):
        data.read_text("notext")
    with pytest.raises(SlimlmError, match="data not found: data/missing.txt"):
        data.read_text("data/missing.txt")


def test_training_and_calibration_read_the_train_split(model_dirs, hub, tmp_path):
    args = ["prune", "--model", str(model_dirs["llama"]), "--calib", "wikitext:wikitext-2-raw-v1", "--nsamples", "1",
            "--seqlen", "4", "--eval", "wikitext:wikitext-2-raw-v1", "--eval-windows", "1", "--output", str(tmp_path / "p")]
    assert main(args) == 0
    assert [c[2] for c in hub] == ["train", "test"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_output_folders_follow_the_umask(model_dirs, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        out = tmp_path / "p"
        assert main(["prune", "--model", str(model_dirs["llama"]), "--method", "magnitude", "--output", str(out)]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == mode
    assert (out / "model.safetensors").stat().st_mode & 0o777 == mode & 0o666


def test_plain_outputs_load_in_transformers_as_slimlm_loads_them(model_dirs, text_file, tmp_path):
    import transformers

    import slimlm

    out = tmp_path / "p"
    assert main(["prune", "--model", str(model_dirs["gpt2"]), "--method", "wanda", "--calib", str(text_file),
                 "--nsamples", "2", "--seqlen", "32", "--output", str(out)]) == 0
    ids = torch.arange(24).unsqueeze(0)
    with torch.no_grad():
        plain = transformers.AutoModelForCausalLM.from_pretrained(out)(ids).logits
        assert torch.equal(plain, slimlm.load(str(out))(ids).logits)
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and f'from_pretrained("{out}")' in card


def test_model_cards_name_the_base_models_licence(model_dirs, tmp_path):
    import shutil

    licensed = tmp_path / "licensed"
    shutil.copytree(model_dirs["llama"], licensed)
    (licensed / "README.md").write_text("---\nlicense: mit\ntags:\n- x\n---\n# a model\n")
    for base, expected in ((licensed, "license: mit"), (model_dirs["llama"], "records none here")):
        out = tmp_path / f"p-{base.name}"
        assert main(["prune", "--model", str(base), "--method", "magnitude", "--output", str(out)]) == 0
        assert expected in (out / "README.md").read_text()
    # a derivative of a derivative keeps it (slimlm's cards carry the licence in their front matter)
    assert main(["prune", "--model", str(tmp_path / "p-licensed"), "--method", "magnitude", "--sparsity", "4:8",
                 "--output", str(tmp_path / "again")]) == 0
    assert "Licence: `mit`, the base model's." in (tmp_path / "again" / "README.md").read_text()
