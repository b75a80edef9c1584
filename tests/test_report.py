"""`slimlm report` over real output folders of every kind: prune, quantize, train (AST), finetune."""
import json
import random

import pytest

from conftest import DATA
from slimlm import output
from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.report.page import describe, short_names
from slimlm.report.plots import curve_panels, curves_figure, quality_figure, quality_panels, token_axis

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(model_dirs, text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    text = str(text_file)
    assert main(["prune", "--model", str(model_dirs["llama"]), "--method", "wanda", "--calib", text, "--nsamples", "4",
                 "--seqlen", "64", "--eval", text, "--eval-windows", "4", "--eval-dense", "--output", str(root / "wanda")]) == 0
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
    assert "## Quality of each run against dense" in text
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
    panels = {p["title"]: p for p in quality_panels(rows, list(runs))}
    assert any(t.startswith("accuracy on") for t in panels) and "sotu_next (acc, lm-eval)" in panels
    # the pruning run evaluated the dense model on its own data: that panel has the dense line
    wanda = rows[list(runs).index("wanda")]
    assert panels[f"perplexity on {wanda['evaluated_on']}"]["dense"] == {
        "dense " + wanda["base_model"]: rep["wanda"]["evaluation"]["dense"]["perplexity"]}
    # the classifier was fine-tuned dense: its accuracy is the reference line of its panel, not a point
    clf = next(p for t, p in panels.items() if t.startswith("accuracy on"))
    assert clf["points"] == [] and list(clf["dense"]) == ["clf (dense)"]


def test_bad_runs_are_named_and_nothing_is_written(runs, tmp_path, capsys):
    page = tmp_path / "r.md"
    assert main(["report", str(runs["wanda"]), str(tmp_path / "nope"), "--output", str(page)]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlimlmError, match="empty has no report.json"):
        describe(tmp_path / "empty")
    with pytest.raises(SlimlmError, match="expected a .md"):
        output_page = tmp_path / "r.html"
        from slimlm.report.page import write
        write([str(runs["wanda"])], str(output_page))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_short_names_disambiguate():
    assert short_names(["a/x/ast", "b/x/ast", "c/naive"]) == ["a/x/ast", "b/x/ast", "naive"]
    assert short_names(["runs/p/ast", "runs/q/ast", "runs/q/gmp"]) == ["p/ast", "q/ast", "gmp"]


def test_token_axis_continues_across_training_stages():
    history = [{"step": s, "tokens": t} for s, t in ((1, 10), (2, 20), (3, 10), (4, 20))]
    assert token_axis(history) == [10, 20, 30, 40]
    assert token_axis([{"step": 1}, {"step": 2}]) == [1, 2]


def row(name: str, value: float | None, kept: int | None = 50, **kw) -> dict:
    """A report row as `describe` makes it, for plots without output folders."""
    return {"path": name, "command": "train", "method": "ast", "budget": "2:4", "base_model": "base",
            "model_kind": "causal-lm", "kept": kept, "dense": 100, "weight_bytes": 0, "metric": "perplexity",
            "value": value, "evaluated_on": "valid.txt (4×64)", "dense_value": None, "tokens": None,
            "seconds": None, "tasks": {}, "history": [], "details": "", **kw}


def tick_labels(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels() if t.get_text()]


def test_quality_plot_gives_each_run_its_place_and_the_dense_line():
    # three 2:4 runs of the same size (one plotted x position each, not one on top of the other),
    # a diverged one (log axis) and a pruning run that measured the dense model
    rows = [row("a", 47.1), row("b", 46.6), row("c", 3000.0), row("p", 198.0, command="prune", dense_value=26.4)]
    fig = quality_figure(rows, ["a", "b", "c", "p"])
    ax = fig.axes[0]
    xs = [c.lines[0].get_xdata()[0] for c in ax.containers]
    assert xs == [0, 1, 2, 3]
    assert [t.split("\n")[0] for t in tick_labels(ax.xaxis)] == ["a", "b", "c", "p"]
    dense = [line for line in ax.get_lines() if line.get_label().startswith("dense")]
    assert len(dense) == 1 and list(dense[0].get_ydata()) == [26.4, 26.4]
    assert dense[0].get_label() == "dense base: 26.4"
    assert "lower is better" in ax.get_ylabel() and ax.get_yscale() == "log"
    fig.canvas.draw()
    labels = tick_labels(ax.yaxis)
    assert labels and all(float(t.replace(",", "")) > 0 for t in labels)  # 30, 100, 1,000: no 10^x
    assert {"100", "1,000"} <= set(labels)


def test_quality_plot_of_accuracy_and_tasks_says_higher_is_better():
    tasks = {"t": {"metrics": {"acc": 0.3, "acc_norm": 0.4}, "stderr": {"acc": 0.05, "acc_norm": 0.05}}}
    rows = [row("clf", 0.8, metric="accuracy", budget="dense"), row("m", 0.6, metric="accuracy"),
            row("lm", None, kept=None, tasks=tasks)]
    fig = quality_figure(rows, ["clf", "m", "lm"])
    acc, task = fig.axes
    assert "higher is better" in acc.get_ylabel() and "higher is better" in task.get_ylabel()
    assert len(acc.containers) == 1 and acc.get_lines()[-1].get_label() == "clf (dense): 0.8"
    assert task.get_title() == "t (acc, lm-eval)" and tick_labels(task.xaxis) == ["lm"]  # no size: name only
    assert quality_figure([row("x", None)], ["x"]) is None


def test_curves_compare_like_with_like_and_skip_empty_panels():
    ce_only = [{"step": s, "tokens": 10 * s, "loss": 3.0, "ce": 3.0} for s in (1, 2)] + [{"step": 2, "val_ppl": 20.0}]
    kd = [{"step": s, "tokens": 10 * s, "loss": 1.5, "ce": 3.5, "kl": 0.5} for s in (1, 2)]
    old = [{"step": s, "loss": 4.0} for s in (1, 2)]  # an older version: no CE record
    clf = [{"step": 1, "tokens": 8, "loss": 0.7, "ce": 0.7, "val_acc": 0.5}]
    rows = [row("ce", 1.0, history=ce_only), row("kd", 1.0, history=kd), row("old", 1.0, history=old),
            row("clf", 0.5, history=clf, model_kind="sequence-classification", metric="accuracy"), row("p", 2.0)]
    panels = {title: lines for title, _, _, _, lines in curve_panels(rows)}
    assert list(panels) == ["causal-lm: training cross-entropy (trailing mean)",
                            "causal-lm: distillation KL to the teacher (trailing mean)",
                            "causal-lm: training objective as logged, runs without CE records (trailing mean)",
                            "causal-lm: validation perplexity",
                            "sequence-classification: training cross-entropy (trailing mean)",
                            "sequence-classification: validation accuracy"]
    ce = dict(panels["causal-lm: training cross-entropy (trailing mean)"])
    assert ce == {0: [(10, 3.0), (20, 3.0)], 1: [(10, 3.5), (20, 3.5)]}  # the KD run's CE, not its mixture
    assert [i for i, _ in panels["causal-lm: distillation KL to the teacher (trailing mean)"]] == [1]
    assert [i for i, _ in panels["causal-lm: training objective as logged, runs without CE records (trailing mean)"]] == [2]
    fig = curves_figure(rows, ["ce", "kd", "old", "clf", "p"])
    drawn = [ax for ax in fig.axes if ax.axison]
    assert len(drawn) == len(panels) and all(ax.lines for ax in drawn)
    assert "higher is better" in drawn[-1].get_ylabel() and drawn[-1].get_yscale() == "linear"


def test_slimlm_eval_results_make_the_report_compare_like_with_like(runs, model_dirs, text_file, tmp_path, capsys):
    causal = {k: runs[k] for k in ("wanda", "int4", "ast")}
    eval_args = ["--data", str(text_file), "--seqlen", "64", "--max-windows", "3", "--bos", "stream"]
    for folder in causal.values():
        assert main(["eval", "--model", str(folder), *eval_args]) == 0
    dense = tmp_path / "dense.json"
    assert main(["eval", "--model", str(model_dirs["llama"]), *eval_args, "--json", str(dense)]) == 0
    rec = json.loads((runs["ast"] / "report.json").read_text())["slimlm_eval"]
    (key, ev), = rec.items()
    assert key == f"{text_file}|64|3|stream" and ev["windows"] == 3 and ev["bos"] == "stream"

    page = tmp_path / "same.md"
    assert main(["report", *map(str, causal.values()), "--output", str(page), "--dense", str(dense)]) == 0
    text = page.read_text()
    assert f"every run measured the same way by `slimlm eval` ({text_file} (3×64, BOS stream))" in text
    rows = [describe(f) for f in causal.values()]
    from slimlm.report.page import like_with_like

    like_with_like(rows, json.loads(dense.read_text()))
    assert [r["value"] for r in rows] == [
        json.loads((f / "report.json").read_text())["slimlm_eval"][key]["perplexity"] for f in causal.values()]
    panel = next(p for p in quality_panels(rows, list(causal)) if p["metric"] == "perplexity")
    assert list(panel["dense"].values()) == [json.loads(dense.read_text())["perplexity"]] and len(panel["points"]) == 3
    # a dense result measured otherwise is refused, naming what must match
    other = tmp_path / "other.json"
    assert main(["eval", "--model", str(model_dirs["llama"]), "--data", str(text_file), "--seqlen", "32",
                 "--max-windows", "3", "--json", str(other)]) == 0
    capsys.readouterr()
    assert main(["report", *map(str, causal.values()), "--output", str(tmp_path / "x.md"), "--dense", str(other)]) == 2
    assert "was not measured as the runs were" in capsys.readouterr().err
