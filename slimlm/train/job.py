"""The training job behind `slimlm train` and `slimlm finetune`: recipe -> model, data, hooks ->
engine -> published folder.

Causal LMs train on packed text windows; encoders train a classification head on labeled JSONL.
LPAF runs two engine runs (movement pruning, then mixed-rank fine-tuning of the factorized model)
with the factorization between them.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import torch

from .. import data, devices, models, output
from . import budget, distributed
from ..errors import SlimlmError
from ..inspect import layer_stats, totals
from .distill import distill_loss, make_teacher
from .datasets import as_dataset, sample_batches
from .engine import Hooks, Trainer
from .mixed_rank import MixedRankTraining, factorize_targets, fisher_information
from .movement import MovementPruning
from .plots import plot_curves
from .sparse import SparseTraining

SPARSE = ("ast", "naive", "gmp")


def checkpoint_dir(output_dir: str) -> Path:
    """Checkpoints and the live metrics log sit beside the output folder, which appears only at the end."""
    out = Path(output_dir)
    return out.with_name(out.name + ".checkpoints")


def load_model_and_data(recipe: dict, device: str = "cpu"):
    """The model and its training/validation data: text for a causal LM, labeled examples otherwise
    (a plain encoder gets a fresh head for the training data's labels). The model is loaded once."""
    d = recipe["data"]
    config, kind = models.inspect_config(recipe["model"])
    if kind == "causal-lm":
        models.fit_seqlen(config, d["seqlen"], "data.seqlen")  # refuses windows past the position table
        loaded = models.load(recipe["model"], device=device)
        train = data.load_tokens(loaded.tokenizer, d["train"], split="train")
        valid = data.load_tokens(loaded.tokenizer, d["valid"], split="validation") if d["valid"] else None
        return loaded, train, valid
    if recipe["method"]["name"] in SPARSE:
        raise SlimlmError(f"model '{recipe['model']}' is a {kind} model: the {recipe['method']['name']} recipe "
                          "trains causal LMs; use movement or lpaf for encoders")
    models.fit_seqlen(config, d["max_length"], "data.max_length")
    if kind == "sequence-classification":
        names = [config.id2label[i] for i in range(config.num_labels)]
        loaded = models.load(recipe["model"], device=device)
    else:
        names = data.label_names(data.read_labeled(d["train"])[1])
        torch.manual_seed(recipe["seed"])  # the fresh head's initialisation follows the recipe's seed
        loaded = models.load(recipe["model"], device=device, labels=names)
    train = data.load_labeled(loaded.tokenizer, d["train"], d["max_length"], names)
    classes = sorted(set(train.labels.tolist()))
    if len(classes) < 2:  # the loss and accuracy would be trivially perfect
        raise SlimlmError(f"training data '{d['train']}' has one class only ({train.names[classes[0]]!r}): a "
                          "classifier learns from examples of at least 2 classes")
    valid = data.load_labeled(loaded.tokenizer, d["valid"], d["max_length"], names) if d["valid"] else None
    return loaded, train, valid


def run(recipe: dict, output_dir: str, overwrite: bool = False, resume: str | None = None) -> dict | None:
    """Train and publish; returns the report (None on the ranks other than 0 under torchrun)."""
    out_path = output.check_output_dir(output_dir, overwrite)
    if not recipe["data"]["train"]:
        raise SlimlmError("the recipe has no training data: set data.train=FILE")
    start = time.perf_counter()
    recipe["train"]["device"] = devices.resolve(recipe["train"]["device"], announce=True)
    device = distributed.init(recipe["train"]["device"])  # joins torchrun's process group, if any
    loaded, train, valid = load_model_and_data(recipe, device)
    run_dir = checkpoint_dir(output_dir)
    if not resume and run_dir.exists():
        if not overwrite:
            raise SlimlmError(f"{run_dir} exists from an earlier run: pass --resume {run_dir}/checkpoint-N "
                              "to continue it, or --overwrite to start over")
        distributed.barrier()  # every rank has seen the old folder before rank 0 removes it
        if distributed.is_main():
            shutil.rmtree(run_dir)
    distributed.barrier()
    dense_params = {n: p.numel() for n, p in loaded.model.named_parameters()}
    name = recipe["method"]["name"]
    if name == "lpaf":
        trainers, hooks = _run_lpaf(loaded, recipe, train, valid, run_dir, resume)
    else:
        hooks = (SparseTraining(recipe, loaded.tokenizer) if name in SPARSE
                 else MovementPruning(recipe) if name == "movement" else Hooks())
        trainers = [Trainer(loaded.model, hooks, recipe, train, valid, run_dir)]
        if resume:
            trainers[0].load_checkpoint(resume)
        trainers[0].train()
    loaded.model = trainers[-1].unsharded_model()  # FSDP: gathered on rank 0, None on the others
    if loaded.model is None:  # rank 0 exports and publishes; the others wait for it
        distributed.barrier()
        return None
    extras = hooks.export(loaded.model)
    # LPAF's two stages each count steps and tokens from zero: count them over the whole run
    history, steps, tokens = [], 0, 0
    for t in trainers:
        history += [{**h, "step": h["step"] + steps, "tokens": h["tokens"] + tokens} for h in t.history]
        steps, tokens = steps + t.step, tokens + t.tokens_seen
    metric = trainers[-1].valid.metric if trainers[-1].valid is not None else None
    report = {
        "command": "finetune" if name == "finetune" else "train", "method": name,
        "sparsity": recipe["method"]["sparsity"] if name in SPARSE else None,
        "keep": recipe["method"]["keep"] if name in ("movement", "lpaf") else None,
        "base_model": recipe["model"], "model_kind": loaded.kind, "recipe": recipe,
        "steps": sum(t.step for t in trainers), "tokens_seen": sum(t.tokens_seen for t in trainers),
        "seconds": time.perf_counter() - start, "final": history[-1] if history else {},
        "validation_metric": metric,
        "best_val": _best(history, metric), "final_val": next((h[metric] for h in reversed(history) if metric in h), None),
        "parameters": parameter_counts(loaded.model, dense_params, getattr(hooks, "target_names", None)
                                       or list(getattr(hooks, "targets", {}))),
        "resumed_from": resume, **extras, "versions": output.versions(),
    }
    if name in SPARSE:
        report["totals"] = totals(loaded.model, hooks.targets)
        report["layers"] = layer_stats(hooks.targets, ranks=False)
    if name == "finetune" and loaded.kind == "sequence-classification":
        report["labels"] = [loaded.model.config.id2label[i] for i in range(loaded.model.config.num_labels)]

    def save_extras(folder: Path) -> None:
        if history:
            (folder / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
            plot_curves(history, folder / "training_curves.png", title=f"{name} on {recipe['model']}")

    if not distributed.is_main():  # DDP: rank 0 publishes; the others wait for it
        distributed.barrier()
        return None
    probe = trainers[0].train_set.get([0])["input_ids"][:, :64].to(trainers[0].device)
    output.publish(loaded, out_path, overwrite, recipe, report, _card(report), report["parameters"]["targets"],
                   getattr(hooks, "sparsity", None) if name in SPARSE else None, probe, extra_save=save_extras)
    distributed.barrier()
    return report


def _best(history: list[dict], metric: str | None):
    values = [h[metric] for h in history if metric and metric in h]
    if not values:
        return None
    return max(values) if metric == "val_acc" else min(values)


def _run_lpaf(loaded, recipe: dict, train, valid, run_dir: Path, resume: str | None):
    """Stage 1: movement pruning (or none); stage 2: factorize, then mixed-rank fine-tuning.
    Each stage has its own checkpoints (run_dir/prune, run_dir/finetune) and schedules."""
    lp = recipe["method"]["lpaf"]
    if lp["prune"] == "none" and lp["factorization"] == "sparsity-aware":
        raise SlimlmError("method.lpaf.factorization=sparsity-aware needs pruning scores: set method.lpaf.prune=movement "
                          "or choose svd or fisher")
    resume_stage = Path(resume).parent.name if resume else None
    bf16 = budget.use_bf16(recipe["train"]["bf16"], next(loaded.model.parameters()).device)
    teacher = make_teacher(loaded.model, recipe["method"]["distill"], bf16) if recipe["method"]["distill"]["enabled"] else None
    first, loaded.model, targets = lpaf_prune_stage(loaded.model, recipe, teacher, train, valid, run_dir, resume,
                                                    finished=resume_stage == "finetune")
    second, hooks = lpaf_lowrank_stage(loaded.model, recipe, teacher, targets, train, valid, run_dir,
                                       resume if resume_stage == "finetune" else None)
    return [t for t in (first, second) if t is not None], hooks


def lpaf_steps(recipe: dict) -> tuple[int, int]:
    """(pruning steps, fine-tuning steps) of an LPAF run."""
    lp, total = recipe["method"]["lpaf"], recipe["train"]["steps"]
    prune = int(lp["prune_fraction"] * total) if lp["prune"] == "movement" else 0
    return prune, total - prune


def lpaf_prune_stage(model, recipe: dict, teacher, train, valid, run_dir: Path, resume: str | None = None,
                     finished: bool = False):
    """Movement pruning to method.keep (or nothing when lpaf.prune=none). Returns (trainer or None,
    the model as a plain module, its target layers, masked and scored). `finished`: restore the stage's
    last checkpoint instead of training."""
    steps, _ = lpaf_steps(recipe)
    if not steps:
        return None, model, models.find_targets(model, recipe["method"]["include"], recipe["method"]["ignore"])
    stage = _stage_recipe(recipe, steps)
    pruning = MovementPruning(stage, steps)
    pruning.teacher = teacher
    trainer = Trainer(model, pruning, stage, train, valid, run_dir / "prune")
    last = run_dir / "prune" / f"checkpoint-{steps}"
    if finished:
        trainer.load_checkpoint(str(last))
    else:
        if resume:
            trainer.load_checkpoint(resume)
        trainer.train()
        if not last.exists():
            trainer.save_checkpoint()  # stage 2 resumes from here
    # factorizing changes the model: drop stage 1's DDP wrapper (its gradient hooks), or under FSDP
    # gather the shards into a plain copy on every rank (each factorizes the same weights identically)
    model = trainer.unsharded_model(everywhere=True)
    # stage 2 needs neither stage 1's optimizer moments nor (FSDP) its shards: let them go
    trainer.model = trainer.forward_model = model
    trainer.optimizer = None
    return trainer, model, {name: model.get_submodule(name) for name in pruning.targets}


def lpaf_lowrank_stage(model, recipe: dict, teacher, targets: dict, train, valid, run_dir: Path,
                       resume: str | None = None):
    """Factorize the targets at the parameter budget, then mixed-rank fine-tuning. Returns (trainer, hooks)."""
    layers = lpaf_factorize(model, recipe, targets, train)
    return lpaf_finetune(model, recipe, teacher, layers, train, valid, run_dir, resume)


def lpaf_factorize(model, recipe: dict, targets: dict, train) -> dict:
    """Replace the targets by mixed-rank layers initialised by the recipe's factorization."""
    lp = recipe["method"]["lpaf"]
    fisher = None
    if lp["factorization"] == "fisher":  # squared gradients of the task loss on seeded training batches
        batches = sample_batches(as_dataset(train, recipe["data"]["seqlen"]), lp["fisher_batches"],
                                 recipe["train"]["batch_size"], recipe["seed"], next(model.parameters()).device)
        fisher = fisher_information(model, targets, batches, lambda m, b: distill_loss(m, None, b, recipe["method"]["distill"]))
    return factorize_targets(model, targets, recipe["method"]["keep"], lp["factorization"], lp["svd_iters"], fisher,
                             lp["pruned_weight"])


def lpaf_finetune(model, recipe: dict, teacher, layers: dict, train, valid, run_dir: Path, resume: str | None = None):
    _, steps = lpaf_steps(recipe)
    stage = _stage_recipe(recipe, steps)
    hooks = MixedRankTraining(stage, layers, teacher, steps)
    hooks.target_names = list(layers)
    trainer = Trainer(model, hooks, stage, train, valid, run_dir / "finetune")
    if resume:
        trainer.load_checkpoint(resume)
    trainer.train()
    return trainer, hooks


def _stage_recipe(recipe: dict, steps: int) -> dict:
    stage = copy.deepcopy(recipe)
    stage["train"]["steps"] = steps
    if stage["train"]["warmup_steps"] != "auto":  # auto is already a fraction of the stage
        stage["train"]["warmup_steps"] = min(stage["train"]["warmup_steps"], max(0, steps - 1))
    return stage


def parameter_counts(model, dense: dict[str, int], targets: list[str]) -> dict:
    """Retained parameters of the target layers as a fraction of dense (the movement/CoFi/LPAF
    convention: non-zeros for sparse layers, factor sizes for low-rank ones), and the whole model."""
    def count(prefixes, table):
        return sum(v for k, v in table.items() if any(k.startswith(p + ".") for p in prefixes))

    now = {n: int((p != 0).sum()) for n, p in model.named_parameters()}
    target_dense = count(targets, dense)
    target_now = count(targets, now)
    return {"targets": targets, "target_dense": target_dense, "target_kept": target_now,
            "target_fraction": target_now / target_dense if target_dense else None,
            "model_dense": sum(dense.values()), "model_nonzero": sum(now.values())}


def _card(report: dict) -> str:
    r, name = report["recipe"], report["method"]
    m = r["method"]
    if name in SPARSE:
        parts = [f"masks: {m['mask_update']}" + (f" (first mask: {m['init']}; refreshed every {report['mask_interval']} "
                                                 f"steps by {report['mask_score']} score, none in the last interval)"
                                                 if m["mask_update"] != "fixed" else f" ({m['init']})")]
        if m["decay"]["mode"] != "none":
            parts.append(f"SR-STE decay λ_max={report['lambda_max']:.4g} ({m['decay']['mode']}"
                         + (f", solved for a {m['decay']['target_shrink']:.0%} shrink of pruned weights"
                            if m["decay"]["lambda_max"] == "auto" else "") + ")")
        what = f"retrained to **{report['sparsity']}** sparsity"
    elif name == "movement":
        parts = [f"first-order scores, cubic schedule to {m['keep']:.0%} of target weights kept"]
        what = "pruned by movement (unstructured)"
    elif name == "lpaf":
        lp = m["lpaf"]
        parts = [f"pruning: {lp['prune']}", f"factorization: {lp['factorization']} SVD",
                 f"mixed-rank fine-tuning: {lp['mixed']}"]
        what = f"factorized to {m['keep']:.0%} of the target-layer parameters (LPAF)"
    else:
        parts, what = ["dense"], "fine-tuned"
    if m["distill"]["enabled"] and name != "finetune":
        parts.append(f"distillation from {m['distill']['teacher'] or 'the dense starting model'} "
                     f"(α={m['distill']['alpha']}, T={m['distill']['temperature']})")
    p = report["parameters"]
    summary = [f"`{report['base_model']}` {what} with slimlm's **{name}** recipe: {'; '.join(parts)}.",
               f"Training: {report['steps']} steps, {report['tokens_seen']:,} tokens of `{r['data']['train']}` "
               f"(lr {r['train']['lr']:g}, seed {r['seed']})."]
    if p["targets"]:
        summary.append(f"Target layers keep {p['target_kept']:,} of {p['target_dense']:,} parameters "
                       f"({p['target_fraction']:.1%}); the whole model has {p['model_nonzero']:,} non-zero parameters "
                       f"(dense: {p['model_dense']:,}).")
    if report.get("slorb_layers"):
        summary.append(f"SLoRB side paths in {report['slorb_layers']} layers ({report['slorb_parameters']:,} "
                       f"parameters, group size {m['slorb']['group_size']}) are stored in `slorb.safetensors`.")
    if report.get("lowrank_ranks"):
        summary.append("Factorized layers: ranks in `config.json` under `slimlm_lowrank`.")
    metric = report["validation_metric"]
    label = {"val_ppl": "validation perplexity", "val_acc": "validation accuracy"}.get(metric)
    results = {f"{label} ({r['data']['valid']})": report["final_val"]} if report["final_val"] is not None else {}
    auto = "AutoModelForCausalLM" if report["model_kind"] == "causal-lm" else "AutoModelForSequenceClassification"
    slimlm_only = bool(report.get("slorb_layers") or report.get("lowrank_ranks"))
    if slimlm_only:
        how = "import slimlm\nmodel = slimlm.load(\"PATH\")  # a transformers model with the layers rebuilt"
    else:
        how = f"from transformers import {auto}\nmodel = {auto}.from_pretrained(\"PATH\")"
    tags = ["slimlm", name] + ([f"sparsity-{report['sparsity'].replace(':', '-')}"] if report["sparsity"] else [])
    return output.model_card(f"{report['base_model']} — {name}", report, summary, results, how, tags, slimlm_only)
