"""Sparse training end to end on a tiny LLaMA: masks, loss, resume, export, errors."""
import json

import pytest
import torch
import transformers

from slimlm.ops import masked
from slimlm import models, recipe
from slimlm.cli import main
from slimlm.data import load_tokens
from slimlm.errors import SlimlmError
from slimlm.models import find_targets, weight_matrix
from slimlm.ops.sparsity import is_valid_nm
from slimlm.train.engine import Trainer
from slimlm.methods.ast import SparseTraining
from conftest import assert_transformers_refuses


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from conftest import DATA

    folder = tmp_path_factory.mktemp("corpus")
    (folder / "train.txt").write_text((DATA / "sotu" / "valid.txt").read_text()[:40_000])
    (folder / "valid.txt").write_text((DATA / "sotu" / "test.txt").read_text()[:8_000])
    return folder


def make_recipe(name, model_dir, corpus, *overrides):
    return recipe.resolve(name, [f"model={model_dir}", f"data.train={corpus / 'train.txt'}",
                                 f"data.valid={corpus / 'valid.txt'}", "data.seqlen=32", "data.eval_windows=4",
                                 "train.batch_size=2", "train.steps=12", "train.warmup_steps=2", "train.lr=3e-3",
                                 "train.eval_every=100", "train.save_every=100", "method.mask_interval=4",
                                 "method.slorb.group_size=8", *overrides])


def build_trainer(rec, run_dir):
    loaded = models.load(rec["model"])
    train = load_tokens(loaded.tokenizer, rec["data"]["train"])
    hooks = SparseTraining(rec, loaded.tokenizer)
    return Trainer(loaded.model, hooks, rec, train, None, run_dir), hooks


def test_masks_refresh_exactly_every_interval_and_stay_valid(model_dirs, corpus, tmp_path):
    rec = make_recipe("ast", model_dirs["llama"], corpus, "method.decay.lambda_max=0.0")
    trainer, hooks = build_trainer(rec, tmp_path / "run")
    history = trainer.train()
    refreshed = [h["step"] for h in history if "mask_flip_rate" in h]
    assert refreshed == [4, 8]  # none in the last interval: the published mask is the trained one
    assert any(h.get("mask_flip_rate", 0) > 0 for h in history)  # adaptive: masks do change
    for module in hooks.targets.values():
        mask = masked.as_out_in(module, masked.get_mask(module))
        assert is_valid_nm(mask.float(), 2, 4) and mask.float().mean() == 0.5


def test_fixed_mask_never_changes_and_lambda_follows_schedule(model_dirs, corpus, tmp_path):
    rec = make_recipe("naive", model_dirs["llama"], corpus)
    trainer, hooks = build_trainer(rec, tmp_path / "run")
    before = {n: masked.get_mask(m).clone() for n, m in hooks.targets.items()}
    history = trainer.train()
    assert all("mask_flip_rate" not in h for h in history)
    assert all(torch.equal(before[n], masked.get_mask(m)) for n, m in hooks.targets.items())
    ast = make_recipe("ast", model_dirs["llama"], corpus, "method.decay.ramp_fraction=0.5", "method.decay.lambda_max=1e-4")
    trainer, _ = build_trainer(ast, tmp_path / "run2")
    lams = [h["lambda"] for h in trainer.train()]
    assert lams[0] == 0 and lams[6:] == [1e-4] * 6 and lams[3] == pytest.approx(0.5e-4)


def test_gradual_pruning_reaches_n_m(model_dirs, corpus, tmp_path):
    rec = make_recipe("gmp", model_dirs["llama"], corpus)
    trainer, hooks = build_trainer(rec, tmp_path / "run")
    history = trainer.train()
    steps = [h["pruned_per_group"] for h in history if "pruned_per_group" in h]
    assert steps == sorted(steps) and steps[-1] == 2


def test_training_loss_falls(model_dirs, corpus, tmp_path):
    rec = make_recipe("ast-slorb", model_dirs["llama"], corpus, "train.steps=30", "method.distill.enabled=false")
    trainer, _ = build_trainer(rec, tmp_path / "run")
    losses = [h["loss"] for h in trainer.train()]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


@pytest.mark.parametrize("name,extra", [("ast-slorb", []), ("gmp", []), ("ast", ["method.init=wanda", "method.nsamples=4"])])
def test_resume_after_a_stop_is_bitwise_identical(model_dirs, corpus, tmp_path, name, extra):
    rec = make_recipe(name, model_dirs["llama"], corpus, "train.save_every=6", *extra)
    full, _ = build_trainer(rec, tmp_path / "full")
    full.train()
    # the "interrupted" run stops after step 7 (checkpoint at 6); a fresh process resumes from step 6
    stopped, _ = build_trainer(rec, tmp_path / "part")
    stopped.train(until=7)
    resumed, _ = build_trainer(rec, tmp_path / "part")
    resumed.load_checkpoint(str(tmp_path / "part" / "checkpoint-6"))
    resumed.train()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_cli_exports_a_plain_checkpoint(model_dirs, corpus, tmp_path, capsys):
    out = tmp_path / "ast"
    args = ["train", "--recipe", "ast", "--output", str(out), f"model={model_dirs['llama']}",
            f"data.train={corpus / 'train.txt'}", f"data.valid={corpus / 'valid.txt'}", "data.seqlen=32",
            "data.eval_windows=2", "train.batch_size=2", "train.steps=6", "train.eval_every=3", "train.save_every=3"]
    assert main(args) == 0
    printed = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["reload_check"]["max_abs_output_diff"] == 0.0 and report["steps"] == 6
    assert (out / "training_curves.png").stat().st_size > 1000 and (out / "metrics.jsonl").is_file()
    assert not (out / "slorb.safetensors").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert all(is_valid_nm(weight_matrix(m), 2, 4) for m in find_targets(model).values())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "ce", "kl", "lr", "lambda", "tokens_per_s"} <= set(lines[0]) and "val_ppl" in lines[2]
    # each validation is printed as it happens; the bar's tokens/s is the mean over the run, not the last step's
    for record in (lines[2], lines[5]):
        assert f"step {record['step']}: val_ppl {record['val_ppl']:.4f}\n" in printed.out
    mean = sum(x["tokens_per_s"] * x["step_seconds"] for x in lines) / sum(x["step_seconds"] for x in lines)
    assert float(printed.err.rsplit("tok_s=", 1)[1].split("]")[0]) == pytest.approx(mean, abs=0.51)
    # a resume whose recipe differs is refused, naming the key
    with pytest.raises(SlimlmError, match="train.lr"):
        rec = recipe.resolve("ast", args[5:] + ["train.lr=1e-3"])
        t, _ = build_trainer(rec, tmp_path / "x")
        t.load_checkpoint(str(tmp_path / "ast.checkpoints" / "checkpoint-3"))


def test_slorb_export_reloads_through_slimlm_load(model_dirs, corpus, tmp_path):
    import slimlm

    out = tmp_path / "slorb"
    assert main(["train", "--recipe", "ast-slorb", "--output", str(out), "--model", str(model_dirs["llama"]),
                 f"data.train={corpus / 'train.txt'}", "data.seqlen=32", "train.batch_size=2", "train.steps=3",
                 "method.slorb.group_size=8"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["slorb_layers"] == 14 and report["reload_check"]["max_abs_output_diff"] == 0.0
    model = slimlm.load(str(out))
    assert sum(isinstance(getattr(m, "slorb", None), torch.nn.Module) for m in model.modules()) == 14
    assert_transformers_refuses(out)  # it would drop the side paths
    card = (out / "README.md").read_text()
    assert "library_name: slimlm" in card and f'slimlm.load("{out}")' in card
    # the README's path: quantize the retrained model; the side paths travel with it
    assert main(["quantize", "--model", str(out), "--bits", "8", "--group-size", "16", "--output", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "slorb.safetensors").is_file()
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        diff = (slimlm.load(str(tmp_path / "q"))(ids).logits - model(ids).logits).abs().max().item()
    assert diff < 0.05


@pytest.mark.parametrize("override,message", [
    ("method.bogus=1", "unknown recipe key 'method.bogus'"),
    ("train.steps=many", "'train.steps' must be an integer"),
    ("method.decay.mode=sideways", "'method.decay.mode' must be one of"),
    ("method.sparsity=0.5", "must be N:M"),
    ("train.warmup_step=3", "unknown recipe key 'train.warmup_step': did you mean 'train.warmup_steps'?"),
    ("steps=3", "unknown recipe key 'steps': did you mean 'train.steps'?"),
    ("method.distil.alpha=0.5", "did you mean 'method.distill.alpha'?"),
    ("train.warmup_steps=101", "train.warmup_steps=101 is more than train.steps=100"),
])
def test_recipe_errors_name_the_key(model_dirs, corpus, tmp_path, capsys, override, message):
    rc = main(["train", "--recipe", "ast", "--output", str(tmp_path / "o"), f"model={model_dirs['llama']}",
               f"data.train={corpus / 'train.txt'}", "data.seqlen=32", override])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unknown_key_far_from_every_key_gets_no_guess():
    with pytest.raises(SlimlmError) as info:
        recipe.resolve("ast", ["method.bogus=1"])
    assert str(info.value) == "unknown recipe key 'method.bogus'"


def test_warmup_longer_than_the_run_is_refused_and_names_its_origin():
    with pytest.raises(SlimlmError) as info:
        recipe.resolve("finetune", ["train.steps=20"])
    assert "train.warmup_steps=50 (from recipe finetune) is more than train.steps=20" in str(info.value)
    assert recipe.resolve("finetune", ["train.steps=20", "train.warmup_steps=20"])["train"]["warmup_steps"] == 20
    assert recipe.resolve("ast", ["train.steps=3"])["train"]["warmup_steps"] == "auto"  # auto scales with the run


def test_print_config_resolves_without_loading_and_reads_back(tmp_path, capsys):
    overrides = ["train.steps=20", "method.sparsity=4:8", "train.lr=1e-3"]
    # a model that does not exist and no --output: nothing is loaded or written
    assert main(["train", "--recipe", "ast", "--model", "no-such-model", "--print-config", *overrides]) == 0
    printed = capsys.readouterr().out
    assert "model: no-such-model\n" in printed and "sparsity: '4:8'" in printed
    saved = tmp_path / "resolved.yaml"
    saved.write_text(printed)
    assert recipe.resolve(str(saved)) == recipe.resolve("ast", ["model=no-such-model", *overrides])
    assert main(["finetune", "--model", "m", "--data", "d.jsonl", "--print-config", "train.steps=60"]) == 0
    printed = capsys.readouterr().out
    assert "name: finetune" in printed and "train: d.jsonl" in printed and "steps: 60" in printed


def test_list_recipes_names_and_describes_each_builtin(capsys):
    assert main(["train", "--list-recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == recipe.builtin_names()
    assert all(len(line.split()) > 2 for line in lines)
    assert "gradual magnitude pruning" in next(line for line in lines if line.startswith("gmp "))


@pytest.mark.parametrize("args,message", [
    (["--recipe", "ast", "--model", "a", "model=b"], "--model a and the override model=b disagree: give one of them"),
    (["--recipe", "ast", "--seed", "1", "seed=2"], "--seed 1 and the override seed=2 disagree"),
    (["--output", "o"], "--recipe is required"),
    (["--recipe", "ast"], "--output is required"),
])
def test_train_options_and_overrides_must_agree(args, message, capsys):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--recipe", "ast", "--model", "a", "model=a", "--print-config"]) == 0  # agreeing is fine
    assert "model: a\n" in capsys.readouterr().out


def test_teacher_with_other_vocabulary_is_refused(model_dirs, corpus, tmp_path, capsys):
    rc = main(["train", "--recipe", "ast", "--output", str(tmp_path / "o"), f"model={model_dirs['llama']}",
               f"data.train={corpus / 'train.txt'}", "data.seqlen=32", "train.steps=2", "train.batch_size=2",
               "method.distill.teacher=smollm2-135m"])
    assert rc == 2 and "has 49152 outputs (vocabulary or classes), the student 384" in capsys.readouterr().err


def test_a_pruned_start_is_refused_as_its_own_teacher(model_dirs, corpus, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dirs["llama"]), "--method", "magnitude", "--output", str(pruned)]) == 0
    args = ["train", "--recipe", "ast", f"model={pruned}", f"data.train={corpus / 'train.txt'}", "data.seqlen=32",
            "train.batch_size=2", "train.steps=2", "method.init=magnitude"]
    assert main(args + ["--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "already pruned (50% of its block weights are zero)" in err and "method.distill.teacher=DENSE" in err
    # with the dense model named as the teacher the same start trains, and distils from something else
    assert main(args + ["--output", str(tmp_path / "b"), f"method.distill.teacher={model_dirs['llama']}"]) == 0
    first = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kl"] > 1e-5  # a copy of the pruned start would give exactly 0
    assert f"distillation from `{model_dirs['llama']}`" in (tmp_path / "b" / "README.md").read_text()


def test_diverging_loss_stops_with_the_step(model_dirs, corpus, tmp_path, capsys):
    rc = main(["train", "--recipe", "naive", "--output", str(tmp_path / "o"), f"model={model_dirs['llama']}",
               f"data.train={corpus / 'train.txt'}", "data.seqlen=32", "train.steps=3", "train.batch_size=2",
               "train.lr=1e30", "train.warmup_steps=0", "train.grad_clip=0.0"])
    err = capsys.readouterr().err
    assert rc == 2 and "diverged" in err and "at step" in err
    assert not (tmp_path / "o").exists()


def test_one_shot_start_keeps_the_dense_weights_outside_its_mask(model_dirs, corpus, tmp_path):
    dense = {n: m.weight.detach().clone() for n, m in find_targets(models.load(model_dirs["llama"]).model).items()}
    rec = make_recipe("ast", model_dirs["llama"], corpus, "method.init=sparsegpt", "method.nsamples=2")
    _, hooks = build_trainer(rec, tmp_path / "run")
    assert hooks.score == "activation" and set(hooks.input_scale) == set(hooks.targets)
    for name, module in hooks.targets.items():
        mask, W = masked.get_mask(module), masked.dense_weight(module).detach()
        assert is_valid_nm(mask.float(), 2, 4) and mask.float().mean() == 0.5
        assert torch.equal(W[~mask], dense[name][~mask])  # pruned weights: their dense values
        assert not torch.equal(W[mask], dense[name][mask])  # kept weights: SparseGPT's update
    zero = make_recipe("ast", model_dirs["llama"], corpus, "method.init=sparsegpt", "method.nsamples=2",
                       "method.init_pruned=zero")
    _, hooks = build_trainer(zero, tmp_path / "zero")
    for module in hooks.targets.values():
        assert (masked.dense_weight(module)[~masked.get_mask(module)] == 0).all()


def test_a_refresh_after_a_one_shot_start_can_flip_a_group(model_dirs, corpus, tmp_path):
    rec = make_recipe("ast", model_dirs["llama"], corpus, "method.init=wanda", "method.nsamples=4")
    _, hooks = build_trainer(rec, tmp_path / "run")
    name, module = next(iter(hooks.targets.items()))
    # nothing trained yet: the activation score reproduces Wanda's mask, so a refresh changes nothing
    assert hooks.refresh() == 0.0
    mask = masked.get_mask(module)
    row, col = (~mask).nonzero()[0].tolist()  # a pruned weight grows far beyond its group
    with torch.no_grad():
        masked.dense_weight(module)[row, col] = 10 * masked.dense_weight(module).abs().max()
    assert hooks.refresh() > 0
    assert masked.get_mask(module)[row, col]
    assert is_valid_nm(masked.get_mask(module).float(), 2, 4)


def test_bf16_autocast_and_gradient_checkpointing_run(model_dirs, corpus, tmp_path, monkeypatch):
    from slimlm.train import budget

    monkeypatch.setattr(budget, "cpu_has_bf16", lambda: True)  # bf16 autocast runs (emulated) on any CPU
    rec = make_recipe("ast", model_dirs["llama"], corpus, "train.bf16=true", "train.grad_checkpointing=true",
                      "train.steps=2")
    trainer, hooks = build_trainer(rec, tmp_path / "run")
    history = trainer.train()
    assert trainer.bf16 and len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert next(hooks.teacher.parameters()).dtype == torch.bfloat16  # teacher_dtype auto follows bf16
    monkeypatch.setattr(budget, "cpu_has_bf16", lambda: False)
    with pytest.raises(SlimlmError, match="train.bf16=true but device 'cpu' has no native bf16"):
        build_trainer(rec, tmp_path / "run2")
    auto = make_recipe("ast", model_dirs["llama"], corpus, "train.steps=2")
    trainer, hooks = build_trainer(auto, tmp_path / "run3")
    assert not trainer.bf16 and next(hooks.teacher.parameters()).dtype == torch.float32


def test_slorb_after_one_shot_init_starts_from_the_dense_weights_the_mask_removed(model_dirs, corpus, tmp_path):
    from slimlm.ops import slorb

    rec = make_recipe("ast-slorb", model_dirs["llama"], corpus, "method.init=wanda", "method.nsamples=4")
    dense = {n: m.weight.detach().clone() for n, m in find_targets(models.load(rec["model"]).model).items()}
    trainer, hooks = build_trainer(rec, tmp_path / "run")
    for name, module in hooks.targets.items():
        mask = masked.get_mask(module)
        assert torch.equal(masked.dense_weight(module)[~mask], dense[name][~mask])  # kept dense, not zeroed
        expected = slorb.mean_init(dense[name], mask, 8)
        assert hooks.slorbs[name].S.abs().sum() > 0
        torch.testing.assert_close(hooks.slorbs[name].S.detach(), expected)


def test_training_curve_panels_only_where_there_is_data():
    from slimlm.train.plots import panel_lines

    kd = [{"step": 1, "loss": 2.0, "ce": 4.0, "kl": 1.0, "lr": 1e-4, "lambda": 0.0, "mask_flip_rate": 0.01},
          {"step": 2, "loss": 1.8, "ce": 3.5, "kl": 0.9, "lr": 1e-4, "lambda": 1.0, "val_ppl": 40.0}]
    panels = dict(panel_lines(kd))
    assert [label for label, _ in panels["training loss (nats)"]] == ["cross-entropy", "KL to the teacher",
                                                                    "objective α·KL + (1-α)·CE"]
    assert list(panels) == ["training loss (nats)", "validation perplexity (lower is better)", "mask flip rate",
                            "learning rate", "SR-STE decay λ"]
    clf = [{"step": 1, "loss": 0.7, "ce": 0.7, "lr": 1e-4}, {"step": 2, "loss": 0.6, "ce": 0.6, "lr": 1e-4, "val_acc": 0.5}]
    panels = dict(panel_lines(clf))
    assert list(panels) == ["training loss (nats)", "validation accuracy (higher is better)", "learning rate"]
    assert panels["training loss (nats)"] == [("cross-entropy", [(1, 0.7), (2, 0.6)])]  # loss == CE: drawn once
