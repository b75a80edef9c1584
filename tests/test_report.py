"""`slimlm report` over real output folders of every kind: prune, quantize, train (AST), finetune."""
import json
import random

import pytest

from conftest import DATA
from slimlm import output
from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.report import describe, short_names
from slimlm.report_plots import quality_panels, token_axis

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(model_dirs, text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    text = str(text_file)
    assert main(["prune", "--model", str(model_dirs["llama"]), "--method", "wanda", "--calib", text, "--nsamples", "4",
                 "--seqlen", "64", "--eval", text, "--eval-windows", "4", "--output", str(root / "wanda")]) == 0
    assert main(["quantize", "--model", str(root / "wanda"), "--bits", "4", "--group-size", "16", "--method", "rtn",
                 "--eval", text, "--eval-windows", "4", "--output", str(root / "int4")]) == 0
    assert main(["train", "--recipe", "ast", "--output", str(root / "ast"), f"model={model_dirs['llama']}",
                 f"data.train={text}", f"data.valid={text}", "data.seqlen=32", "data.eval_windows=2",
                 "train.batch_size=2", "train.steps=4", "train.eval_every=2"]) == 0
    brown = root / "brown"
    brown.mkdir()
    for split, n in (("train", 64), ("test", 32)):
        rows = (DATA / "brown" / f"{split}.jsonl").read_text().splitlines()
        random.Random(0).shuffle(rows)
        (brown / f"{split}.jsonl").write_text("\n".join(rows[:n]) + "\n")
    assert main(["finetune", "--model", str(model_dirs["bert"]), "--data", str(brown / "train.jsonl"),
                 "--valid", str(brown / "test.jsonl"), "--output", str(root / "clf"), "train.steps=4",
                 "train.warmup_steps=1", "train.batch_size=8", "train.eval_every=2", "data.max_length=32"]) == 0
    return {name: root / name for name in ("wanda", "int4", "ast", "clf")}


def test_every_model_card_states_data_budget_and_scores(runs):
    rep = reports(runs)
    cards = {name: (folder / "README.md").read_text() for name, folder in runs.items()}
    assert "Budget: 256 calibration tokens (4 windows of 64 from" in cards["wanda"]
    assert "Budget: no calibration data;" in cards["int4"]
    assert f"Budget: {rep['ast']['tokens_seen']:,} training tokens;" in cards["ast"] and "4 steps" in cards["ast"]
    assert f"Budget: {rep['clf']['tokens_seen']:,} training tokens;" in cards["clf"]
    for name, card in cards.items():
        assert card.index("Budget:") < card.index("## How to load"), name
        assert "| evaluation | value |" in card, name  # each ran its own evaluation
    assert f"{rep['wanda']['evaluation']['pruned']['perplexity']:.4g}" in cards["wanda"]
    assert f"{rep['clf']['final_val']:.4g}" in cards["clf"]


def reports(runs):
    return {name: json.loads((folder / "report.json").read_text()) for name, folder in runs.items()}


def test_describe_reads_every_kind(runs):
    rep = reports(runs)
    rows = {name: describe(folder) for name, folder in runs.items()}
    assert rows["wanda"]["method"] == "prune wanda" and rows["wanda"]["budget"] == "2:4"
    assert rows["wanda"]["kept"] == rep["wanda"]["totals"]["model_nonzero"]
    assert rows["wanda"]["value"] == rep["wanda"]["evaluation"]["pruned"]["perplexity"]
    assert rows["wanda"]["tokens"] == 4 * 64 and rows["wanda"]["history"] == []

    # the int4 folder stores half of each 2:4 target layer's weights, and everything else unquantized
    t = rep["wanda"]["totals"]
    assert rows["int4"]["kept"] == t["model_parameters"] - t["target_parameters"] // 2
    assert rows["int4"]["dense"] == t["model_parameters"]
    assert rows["int4"]["method"] == "quantize rtn" and rows["int4"]["budget"] == "int4, group 16"
    assert rows["int4"]["weight_bytes"] < rows["wanda"]["weight_bytes"]
    assert rows["int4"]["value"] == rep["int4"]["evaluation"]["quantized"]["perplexity"]

    assert rows["ast"]["method"] == "ast" and rows["ast"]["metric"] == "perplexity"
    assert rows["ast"]["tokens"] == 4 * 2 * 32 and rows["ast"]["value"] == rep["ast"]["final_val"]
    assert [h["step"] for h in rows["ast"]["history"]] == [1, 2, 3, 4]
    assert rows["clf"]["metric"] == "accuracy" and 0 <= rows["clf"]["value"] <= 1
    assert rows["clf"]["budget"] == "dense" and rows["clf"]["kept"] == rep["clf"]["parameters"]["model_nonzero"]


def test_report_renders_runs_of_different_kinds(runs, tmp_path):
    tasks = {"sotu_next": {"metrics": {"acc": 0.25, "acc_norm": 0.5}, "stderr": {"acc": 0.1, "acc_norm": 0.1},
                           "samples": 20, "num_fewshot": 0, "date": "2026-01-01T00:00:00+00:00"}}
    output.record_task_scores(runs["wanda"], tasks)
    page = tmp_path / "cmp.md"
    assert main(["report", *map(str, runs.values()), "--output", str(page)]) == 0
    text = page.read_text()
    for png in ("cmp-quality.png", "cmp-curves.png"):
        assert f"]({png})" in text and (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp-curves.png", "cmp-quality.png", "cmp.md"]
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert "sotu_next (acc)" in table[0] and len(table) == 1 + len(runs)
    rep = reports(runs)
    wanda_row = next(line for line in table if line.startswith("| wanda |"))
    assert f"{rep['wanda']['evaluation']['pruned']['perplexity']:.2f}" in wanda_row and "0.250 ± 0.100" in wanda_row
    assert next(line for line in table if line.startswith("| clf |")).count("| — |") >= 2  # no perplexity, no task
    assert "| int4 | quantize rtn | int4, group 16 |" in text

    # the quality panels keep perplexity, accuracy and each task apart
    rows = [describe(f) for f in runs.values()]
    titles = [title for title, _ in quality_panels(rows, list(runs))]
    assert any(t.startswith("accuracy on") for t in titles) and "sotu_next (acc, lm-eval)" in titles
    assert sum(t.startswith("perplexity on") for t in titles) >= 1


def test_bad_runs_are_named_and_nothing_is_written(runs, tmp_path, capsys):
    page = tmp_path / "r.md"
    assert main(["report", str(runs["wanda"]), str(tmp_path / "nope"), "--output", str(page)]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlimlmError, match="empty has no report.json"):
        describe(tmp_path / "empty")
    with pytest.raises(SlimlmError, match="expected a .md"):
        output_page = tmp_path / "r.html"
        from slimlm.report import write
        write([str(runs["wanda"])], str(output_page))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_short_names_disambiguate():
    assert short_names(["a/x/ast", "b/x/ast", "c/naive"]) == ["a/x/ast", "b/x/ast", "naive"]
    assert short_names(["runs/p/ast", "runs/q/ast", "runs/q/gmp"]) == ["p/ast", "q/ast", "gmp"]


def test_token_axis_continues_across_training_stages():
    history = [{"step": s, "tokens": t} for s, t in ((1, 10), (2, 20), (3, 10), (4, 20))]
    assert token_axis(history) == [10, 20, 30, 40]
    assert token_axis([{"step": 1}, {"step": 2}]) == [1, 2]
