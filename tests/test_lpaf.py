"""LPAF and its parts on tiny models: task fine-tuning, movement pruning, factorization, mixed-rank
fine-tuning, export/reload, and the errors users get."""
import json
import random

import pytest
import torch
import transformers
from torch import nn

import slimlm
from slimlm.ops import masked
from slimlm import recipe
from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.ops.factorized import LowRankLinear, MixedRankLinear
from slimlm.ops.lowrank import rank_for_budget
from slimlm.train.job import run as train_run
from slimlm.methods.lpaf import MixedRankTraining
from slimlm.methods.movement import MovementPruning, scores_of
from slimlm.methods.movement import importance as movement_importance
from conftest import assert_transformers_refuses


@pytest.fixture(scope="module")
def brown(tmp_path_factory):
    """A shuffled slice of the Brown genre task (15 string labels)."""
    from conftest import DATA

    folder = tmp_path_factory.mktemp("brown")
    for split, n in (("train", 240), ("test", 60)):
        rows = (DATA / "brown" / f"{split}.jsonl").read_text().splitlines()
        random.Random(0).shuffle(rows)
        (folder / f"{split}.jsonl").write_text("\n".join(rows[:n]) + "\n")
    return folder


@pytest.fixture(scope="module")
def classifier(model_dirs, brown, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "bert-brown"
    assert main(["finetune", "--model", str(model_dirs["bert"]), "--data", str(brown / "train.jsonl"),
                 "--valid", str(brown / "test.jsonl"), "--output", str(out), "train.steps=12",
                 "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=2", "train.eval_every=6",
                 "data.max_length=48"]) == 0
    return out


def small(name, model, brown, *overrides):
    return recipe.resolve(name, [f"model={model}", f"data.train={brown / 'train.jsonl'}",
                                 f"data.valid={brown / 'test.jsonl'}", "data.max_length=48", "train.batch_size=8",
                                 "train.steps=12", "train.warmup_steps=2", "train.lr=1e-3", "train.eval_every=6",
                                 "train.save_every=100", "method.keep=0.25", *overrides])


def test_finetune_makes_a_stock_classifier_with_the_data_labels(classifier, brown):
    report = json.loads((classifier / "report.json").read_text())
    labels = sorted({json.loads(x)["label"] for x in (brown / "train.jsonl").read_text().splitlines()})
    assert report["labels"] == labels and report["validation_metric"] == "val_acc"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(classifier)
    assert model.config.id2label[0] == labels[0] and model.config.num_labels == len(labels)
    losses = [json.loads(x)["loss"] for x in (classifier / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_finetune_on_one_class_is_refused(model_dirs, brown, tmp_path, capsys):
    rows = [json.loads(x) for x in (brown / "train.jsonl").read_text().splitlines()]
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": r["text"], "label": "news"}) + "\n" for r in rows[:40]))
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(model_dirs["bert"]), "--data", str(one), "--valid", str(one),
                 "--output", str(out), "train.steps=2", "train.warmup_steps=0", "train.batch_size=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"slimlm finetune: error: training data '{one}' has one class only ('news'): a classifier "
                   "learns from examples of at least 2 classes")
    assert not out.exists()


def test_eval_reports_accuracy_of_a_classifier(classifier, brown, tmp_path):
    out = tmp_path / "acc.json"
    assert main(["eval", "--model", str(classifier), "--data", str(brown / "test.jsonl"), "--json", str(out),
                 "--max-length", "48"]) == 0
    result = json.loads(out.read_text())
    assert result["examples"] == 60 and 0.0 <= result["accuracy"] <= 1.0
    assert result["correct"] == round(result["accuracy"] * 60)


def test_sensitivity_scores_of_a_layer_by_hand():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
    model = nn.Sequential(layer)
    rec = recipe.resolve("movement", ["method.distill.enabled=false", "method.movement.score=sensitivity"])
    hooks = MovementPruning(rec, total_steps=10)
    hooks.targets = {"0": layer}
    masked.attach_mask(layer, torch.ones(2, 3, dtype=torch.bool), ste=True)
    layer.parametrizations.weight[0].register_buffer("scores", torch.zeros(2, 3))
    layer.parametrizations.weight[0].register_buffer("uncertainty", torch.zeros(2, 3))
    masked.set_mask(layer, torch.tensor([[True, True, False], [True, False, True]]))
    x, c = torch.tensor([[1.0, 2.0, -1.0]]), torch.tensor([[1.0, -1.0]])
    (model(x) * c).sum().backward()
    # dL/dW' = c^T x = [[1, 2, -1], [-1, -2, 1]]; W' = W * M; I = |W' dL/dW'| = [[1, 4, 0], [0, 0, 1]]
    importance = torch.tensor([[1.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    hooks.after_backward(0)
    parametrization = layer.parametrizations.weight[0]
    torch.testing.assert_close(parametrization.scores, 0.15 * importance)  # (1 - beta1) I
    torch.testing.assert_close(parametrization.uncertainty, 0.05 * 0.85 * importance)  # (1 - beta2) |I - avg|
    torch.testing.assert_close(movement_importance(layer, hooks.mv), 0.15 * 0.0425 * importance**2)
    # pruned weights get no gradient of their own, and score 0: pruned stays pruned
    grad = masked.dense_weight(layer).grad
    assert torch.equal(grad, torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.0, 1.0]]))


def test_movement_keep_follows_the_cubic_schedule_and_masks_match(classifier, brown, tmp_path):
    rec = small("movement", classifier, brown, "method.movement.start_fraction=0.25",
                "method.movement.hold_fraction=0.25")
    report = train_run(rec, str(tmp_path / "mv"))
    keeps = [h["keep"] for h in report_history(tmp_path / "mv")]
    assert keeps[:3] == [1.0, 1.0, 1.0] and keeps[-3:] == [0.25] * 3
    assert all(a >= b for a, b in zip(keeps, keeps[1:]))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "mv")
    for name in report["parameters"]["targets"]:
        w = model.get_submodule(name).weight
        assert int((w != 0).sum()) == w.numel() - int(w.numel() * 0.75)
    # the head and the pooler stay dense: they are not targets
    outside = [(n, m.weight) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and ("pooler" in n or "classifier" in n)]
    assert {n for n, _ in outside} & {"classifier"} and not {n for n, _ in outside} & set(report["parameters"]["targets"])
    assert all(bool((w != 0).all()) for _, w in outside)


def report_history(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("score", ["learned", "sensitivity"])
def test_movement_resume_is_bitwise_identical(classifier, brown, tmp_path, score):
    from slimlm import data, models
    from slimlm.train.engine import Trainer

    rec = small("movement", classifier, brown, "train.save_every=5", "method.distill.enabled=true",
                f"method.movement.score={score}", "train.warmup_steps=1", "method.movement.start_fraction=0.1")

    def build(run_dir):
        loaded = models.load(rec["model"])
        names = [loaded.model.config.id2label[i] for i in range(loaded.model.config.num_labels)]
        train = data.load_labeled(loaded.tokenizer, rec["data"]["train"], 48, names)
        return Trainer(loaded.model, MovementPruning(rec), rec, train, None, run_dir)

    full = build(tmp_path / "full")
    full.train()
    part = build(tmp_path / "part")
    part.train(until=6)
    resumed = build(tmp_path / "part")
    resumed.load_checkpoint(str(tmp_path / "part" / "checkpoint-5"))
    resumed.train()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert any(k.endswith("scores") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mixed_rank_schedule_reaches_pure_low_rank():
    layers = {f"l{i}": MixedRankLinear(torch.randn(6, 8), torch.ones(6, 8, dtype=torch.bool), None,
                                       LowRankLinear(8, 6, 4, bias=False)) for i in range(16)}
    rec = recipe.resolve("lpaf", ["method.lpaf.mixed_fraction=0.5"])
    hooks = MixedRankTraining(rec, layers, None, total_steps=20)
    seen = []
    for step in range(20):
        hooks.before_forward(step)
        seen.append(sum(layer.use_lowrank for layer in layers.values()))
    assert 0 < seen[0] < 16 and seen[10:] == [16] * 10  # a mixture early, only the factors from step 10 on
    assert sum(seen[:3]) < sum(seen[6:9])
    rank = MixedRankTraining(recipe.resolve("lpaf", ["method.lpaf.mixed=rank"]), layers, None, total_steps=20)
    rank.before_forward(0)
    ranks = [layer.lowrank.active_rank for layer in layers.values()]
    assert all(layer.use_lowrank for layer in layers.values()) and all(1 <= r <= 4 for r in ranks)
    rank.before_forward(19)
    assert all(layer.lowrank.active_rank is None for layer in layers.values())


def test_lpaf_end_to_end_exports_factors_that_reload_identically(classifier, brown, tmp_path):
    out = tmp_path / "lpaf"
    report = train_run(small("lpaf", classifier, brown), str(out))
    assert report["reload_check"]["max_abs_output_diff"] == 0.0
    p = report["parameters"]
    assert p["target_fraction"] <= 0.25 + 0.02 and p["model_nonzero"] < p["model_dense"]
    config = json.loads((out / "config.json").read_text())
    assert set(config["slimlm_lowrank"]) == set(p["targets"]) and "pickle" not in " ".join(x.name for x in out.iterdir())
    model = slimlm.load(str(out))
    layer = model.get_submodule(p["targets"][0])
    assert isinstance(layer, LowRankLinear) and layer.rank == config["slimlm_lowrank"][p["targets"][0]]
    history = report_history(out)
    assert history[5]["keep"] < 1 and history[-1]["lowrank_prob"] == 1.0  # pruning, then low-rank
    # steps and tokens count over both stages
    assert [h["step"] for h in history] == list(range(1, 13))
    tokens = [h["tokens"] for h in history]
    assert tokens == sorted(tokens) and tokens[-1] == report["tokens_seen"]
    assert f'slimlm.load("{out}")' in (out / "README.md").read_text()
    assert_transformers_refuses(out, transformers.AutoModelForSequenceClassification)


def test_lpaf_merge_gives_a_stock_checkpoint(classifier, brown, tmp_path):
    out = tmp_path / "merged"
    train_run(small("lpaf", classifier, brown, "method.lpaf.merge=true", "method.lpaf.factorization=svd",
                    "train.steps=6"), str(out))
    stock = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ours = slimlm.load(str(out))
    ids = torch.randint(5, 100, (2, 16))
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, ours(ids).logits)
    report = json.loads((out / "report.json").read_text())
    name = report["parameters"]["targets"][0]
    weight = stock.get_submodule(name).weight.detach().double()
    assert torch.linalg.matrix_rank(weight, rtol=1e-5) <= rank_for_budget(*weight.shape, 0.25) < min(weight.shape)


def test_lpaf_on_a_decoder_factorizes_the_dense_weights_with_fisher(model_dirs, tmp_path):
    from conftest import DATA

    text = tmp_path / "t.txt"
    text.write_text((DATA / "sotu" / "valid.txt").read_text()[:20_000])
    rec = recipe.resolve("lpaf", [f"model={model_dirs['llama']}", f"data.train={text}", f"data.valid={text}",
                                  "data.seqlen=32", "data.eval_windows=2", "train.batch_size=2", "train.steps=4",
                                  "train.eval_every=4", "method.lpaf.prune=none", "method.lpaf.factorization=fisher",
                                  "method.lpaf.calib_batches=2", "method.keep=0.5", "train.warmup_steps=1"])
    report = train_run(rec, str(tmp_path / "out"))
    assert report["validation_metric"] == "val_ppl" and report["final_val"] > 1
    assert report["reload_check"]["max_abs_output_diff"] == 0.0
    assert 0.4 < report["parameters"]["target_fraction"] <= 0.5


def test_lpaf_errors_name_the_problem(classifier, brown, model_dirs, tmp_path):
    with pytest.raises(SlimlmError, match="sparsity-aware needs pruning scores"):
        train_run(small("lpaf", classifier, brown, "method.lpaf.prune=none",
                             "method.lpaf.factorization=sparsity-aware"), str(tmp_path / "a"))
    with pytest.raises(SlimlmError, match="method.keep"):
        small("lpaf", classifier, brown, "method.keep=1.5")
    with pytest.raises(SlimlmError, match="which the ast method does not train: use one of finetune, lpaf, movement"):
        train_run(small("ast", classifier, brown), str(tmp_path / "b"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a passage", "label": "no-such-genre"}\n' * 4)
    with pytest.raises(SlimlmError, match="no-such-genre"):
        train_run(small("movement", classifier, brown, f"data.valid={bad}"), str(tmp_path / "c"))
    with pytest.raises(SlimlmError, match="causal-lm model: a new classification head goes on a plain encoder"):
        from slimlm.models import load

        load(str(model_dirs["llama"]), labels=["a", "b"])


def test_lpaf_resumed_in_its_fine_tuning_stage_ends_bitwise_equal(classifier, brown, tmp_path):
    from safetensors.torch import load_file

    rec = small("lpaf", classifier, brown, "train.save_every=3", "method.lpaf.factorization=fisher",
                "method.lpaf.calib_batches=2")
    train_run(rec, str(tmp_path / "full"))
    train_run(rec, str(tmp_path / "part"))
    checkpoint = tmp_path / "part.checkpoints" / "finetune" / "checkpoint-3"
    assert checkpoint.is_dir() and (tmp_path / "part.checkpoints" / "prune" / "checkpoint-6").is_dir()
    import shutil

    shutil.rmtree(tmp_path / "part")
    train_run(rec, str(tmp_path / "part"), resume=str(checkpoint))
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_inspect_plots_spectra_and_counts_factor_weights(classifier, brown, tmp_path, capsys):
    out = tmp_path / "lpaf"
    train_run(small("lpaf", classifier, brown, "method.lpaf.factorization=svd", "train.steps=4"), str(out))
    png = tmp_path / "spectra.png"
    assert main(["inspect", str(classifier), str(out), "--labels", "dense,lpaf", "--spectra", str(png),
                 "--json", str(tmp_path / "layers.json")]) == 0
    assert png.stat().st_size > 10_000
    layers = json.loads((tmp_path / "layers.json").read_text())
    dense, lowrank = (x["layers"] for x in layers)
    assert len(dense) == len(lowrank)  # a factorized layer is one target, not its two thin parts
    for d, low in zip(dense, lowrank):
        assert low["rank"] == low["effective_rank"] or low["rank"] < d["rank"]
        assert low["stored"] < d["stored"] and low["rank"] <= rank_for_budget(*d["shape"], 0.25)
    assert main(["inspect", str(out), "--labels", "a,b"]) == 2
    assert "--labels has 2 names for 1 models" in capsys.readouterr().err


def test_lpaf_prunes_from_the_pretrained_model_with_the_finetuned_teacher(classifier, brown, model_dirs, tmp_path):
    """Fine-pruning as in the reference: a fresh head on the pre-trained encoder, KD from the fine-tuned model."""
    rec = small("lpaf", model_dirs["bert"], brown, f"method.distill.teacher={classifier}",
                "method.movement.score=sensitivity", "train.warmup_steps=1")
    report = train_run(rec, str(tmp_path / "fp"))
    history = report_history(tmp_path / "fp")
    assert all(h["kl"] > 0 for h in history[:3])  # a real teacher from the first step
    assert report["labels"] == json.loads((classifier / "report.json").read_text())["labels"]
    assert report["lowrank_ranks"]
