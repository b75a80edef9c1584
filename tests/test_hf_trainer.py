"""AST inside a stock transformers.Trainer (slimlm.hf) on a tiny LLaMA: the same run as `slimlm train`,
checkpoints that resume and load, a plain 2:4 export."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import slimlm
from slimlm import hf, models
from slimlm.ops import masked
from slimlm.cli import main
from slimlm.data import load_tokens
from slimlm.errors import SlimlmError
from slimlm.models import find_targets, weight_matrix
from slimlm.ops.sparsity import is_valid_nm
from slimlm.train.engine import Hooks, Trainer as Engine

STEPS = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from conftest import DATA

    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text((DATA / "sotu" / "valid.txt").read_text()[:40_000])
    return path


def settings(corpus, *extra):
    """One run, described once for both sides: bf16 off, Wanda's first mask, refreshes every 4 steps."""
    return [f"data.train={corpus}", "data.seqlen=32", "train.batch_size=2", f"train.steps={STEPS}",
            "train.warmup_steps=2", "train.lr=3e-3", "train.bf16=false", "train.eval_every=100", "train.save_every=6",
            "method.mask_interval=4", "method.nsamples=4", *extra]


def hf_trainer(model_dir, corpus, output_dir, *extra):
    loaded = models.load(str(model_dir))
    parts = hf.prepare("ast", loaded.model, loaded.tokenizer, settings(corpus, *extra))
    trainer = transformers.Trainer(model=loaded.model, args=parts.training_args(output_dir, disable_tqdm=True),
                                   train_dataset=parts.train_dataset(), optimizers=parts.optimizers,
                                   compute_loss_func=parts.compute_loss, callbacks=[parts.callback],
                                   processing_class=loaded.tokenizer)
    return trainer, parts


def step_logs(trainer) -> dict[int, dict]:
    return {h["step"]: h for h in trainer.state.log_history if "loss" in h}


def run_both(model_dir, corpus, root, *extra):
    """`slimlm train --recipe ast` and the same recipe through a transformers.Trainer."""
    assert main(["train", "--recipe", "ast", "--output", str(root / "cli"), f"model={model_dir}",
                 *settings(corpus, *extra)]) == 0
    cli = [json.loads(x) for x in (root / "cli" / "metrics.jsonl").read_text().splitlines()]
    trainer, parts = hf_trainer(model_dir, corpus, root / "hf", *extra)
    trainer.train()
    parts.save(root / "hf-final")
    return {"root": root, "cli": cli, "trainer": trainer, "parts": parts}


def assert_same_run(runs, steps):
    """Per step: the same losses, gradient norm, lr, decay strength and mask refreshes; the same published weights."""
    cli, hf_logs = runs["cli"], step_logs(runs["trainer"])
    assert sorted(hf_logs) == list(range(1, steps + 1)) == [r["step"] for r in cli]
    for r in cli:
        h = hf_logs[r["step"]]
        for key in ("loss", "ce", "kl", "grad_norm", "lambda"):
            assert h[key] == pytest.approx(r[key], rel=1e-5, abs=1e-7), (r["step"], key)
        assert h["learning_rate"] == pytest.approx(r["lr"], rel=1e-12)
        assert ("mask_flip_rate" in h) == ("mask_flip_rate" in r)
        if "mask_flip_rate" in r:
            assert h["mask_flip_rate"] == pytest.approx(r["mask_flip_rate"], abs=1e-3)
    assert any(r["mask_flip_rate"] > 0 for r in cli if "mask_flip_rate" in r)  # the masks do move
    mine = load_file(str(runs["root"] / "hf-final" / "model.safetensors"))
    theirs = load_file(str(runs["root"] / "cli" / "model.safetensors"))
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.allclose(mine[k], theirs[k], atol=1e-5), k
        assert torch.equal(mine[k] == 0, theirs[k] == 0) or ".layers." not in k, k


@pytest.fixture(scope="module")
def runs(model_dirs, corpus, tmp_path_factory):
    return run_both(model_dirs["llama"], corpus, tmp_path_factory.mktemp("runs"))


def test_dataset_is_the_engines_batch_sequence(model_dirs, corpus):
    loaded = models.load(str(model_dirs["llama"]))
    rec = slimlm.recipe.resolve("ast", settings(corpus, "train.steps=400"))  # past one epoch: a reshuffle
    engine = Engine(loaded.model, Hooks(), rec, load_tokens(loaded.tokenizer, str(corpus), split="train"), None, "unused")
    parts = hf.TrainerParts.__new__(hf.TrainerParts)
    parts.recipe, parts.tokenizer = rec, loaded.tokenizer
    examples = [e["input_ids"] for e in parts.train_dataset()]
    assert len(examples) == 400 * 2 and len(examples) > len(engine.train_set)
    for i in range(400):
        assert torch.equal(torch.stack(examples[2 * i:2 * i + 2]), engine.batch(i)["input_ids"])


def test_ast_in_a_trainer_equals_slimlm_train(runs):
    assert_same_run(runs, STEPS)
    assert [r["step"] for r in runs["cli"] if "mask_flip_rate" in r] == [4, 8]


def test_gradient_accumulation_equals_slimlm_train(model_dirs, corpus, tmp_path):
    # windows of equal length: the Trainer's token-weighted micro-batches are the engine's mean of means
    runs = run_both(model_dirs["llama"], corpus, tmp_path, "train.grad_accum=2", "train.steps=4",
                    "method.mask_interval=2")
    assert_same_run(runs, 4)


def test_export_is_a_plain_2_4_checkpoint(runs, tokenizer):
    folder = runs["root"] / "hf-final"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    targets = find_targets(model)
    assert len(targets) == 14 and all(is_valid_nm(weight_matrix(m), 2, 4) for m in targets.values())
    assert all(weight_matrix(m).eq(0).float().mean() == 0.5 for m in targets.values())
    ids = tokenizer("The state of the union is strong.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, runs["parts"].model.eval()(ids).logits)
    assert not any(masked.is_masked(m) for m in runs["parts"].model.modules())
    assert transformers.AutoTokenizer.from_pretrained(folder).vocab_size == tokenizer.vocab_size


def test_checkpoint_loads_masked_and_resumes_to_the_same_end(runs, model_dirs, corpus, tmp_path):
    checkpoint = runs["root"] / "hf" / "checkpoint-6"
    state = load_file(str(checkpoint / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    assert f"{name}.parametrizations.weight.original" in state and f"{name}.parametrizations.weight.0.mask" in state
    # slimlm.load: the model at step 6 with its masks baked in, not a freshly initialised one
    model = slimlm.load(str(checkpoint))
    for target, module in find_targets(model).items():
        original = state[f"{target}.parametrizations.weight.original"]
        mask = state[f"{target}.parametrizations.weight.0.mask"]
        assert torch.equal(module.weight, original * mask) and is_valid_nm(module.weight, 2, 4)
    assert torch.equal(model.model.embed_tokens.weight, state["model.embed_tokens.weight"])
    # a fresh process resumes from step 6 and ends where the uninterrupted run ended
    trainer, parts = hf_trainer(model_dirs["llama"], corpus, tmp_path / "resumed")
    trainer.train(resume_from_checkpoint=str(checkpoint))
    full, resumed = step_logs(runs["trainer"]), step_logs(trainer)  # steps 1-6 come from the checkpoint
    assert sorted(resumed) == list(range(1, STEPS + 1)) and trainer.state.global_step == STEPS
    for step in range(7, STEPS + 1):
        for key in ("loss", "kl", "grad_norm", "learning_rate", "lambda"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-5), (step, key)
    assert resumed[8]["mask_flip_rate"] == pytest.approx(full[8]["mask_flip_rate"])
    a, b = runs["parts"].model.state_dict(), parts.model.state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_refuses_a_trainer_that_would_not_follow_the_recipe(model_dirs, corpus, tmp_path):
    loaded = models.load(str(model_dirs["llama"]))
    parts = hf.prepare("ast", loaded.model, loaded.tokenizer, settings(corpus, "method.init=magnitude"))
    args = parts.training_args(tmp_path, max_steps=STEPS + 1, disable_tqdm=True)
    trainer = transformers.Trainer(model=loaded.model, args=args, train_dataset=parts.train_dataset(),
                                   optimizers=parts.optimizers, compute_loss_func=parts.compute_loss,
                                   callbacks=[parts.callback])
    with pytest.raises(SlimlmError, match="train.steps=12"):
        trainer.train()
    trainer = transformers.Trainer(model=loaded.model, args=parts.training_args(tmp_path, disable_tqdm=True),
                                   train_dataset=parts.train_dataset(), compute_loss_func=parts.compute_loss,
                                   callbacks=[parts.callback])
    with pytest.raises(SlimlmError, match="optimizers=parts.optimizers"):
        trainer.train()
    with pytest.raises(SlimlmError, match="N:M sparse training of causal LMs"):
        hf.prepare("lpaf", loaded.model, loaded.tokenizer, settings(corpus))
