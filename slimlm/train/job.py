"""The training job behind `slimlm train` and `slimlm finetune`: recipe -> model and data -> the
recipe's method (slimlm/methods, found by name) runs the engine -> export -> published folder.
The job never branches on a method's name: what differs is in the method object.

Causal LMs train on packed text windows; encoders train a classification head on labeled JSONL.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .. import data, devices, methods, models, output
from .. import markdown as md
from ..errors import SlimlmError
from . import checkpoint, distributed
from .plots import plot_curves


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
        train = data.load_tokens(loaded.tokenizer, d["train"], split="train", separator=d["separator"],
                                 max_tokens=d["max_tokens"], **data.options(d))
        # validation keeps the perplexity protocol of `slimlm eval` (documents joined by a blank line)
        valid = data.load_tokens(loaded.tokenizer, d["valid"], split="validation", **data.options(d)) if d["valid"] else None
        return loaded, train, valid
    trains = "sequence-classification" if kind == "encoder" else kind  # a plain encoder gets a head
    if trains not in methods.get(recipe["method"]["name"]).kinds:
        fitting = sorted(n for n, cls in methods.REGISTRY.items() if trains in cls.kinds)
        raise SlimlmError(f"model '{recipe['model']}' is a {kind} model, which the {recipe['method']['name']} method "
                          f"does not train: use one of {', '.join(fitting)}")
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


def run(recipe: dict, output_dir: str, overwrite: bool = False, resume: str | None = None,
        command: str = "train") -> dict | None:
    """Train and publish; returns the report (None on the ranks other than 0 under torchrun)."""
    method_class = methods.get(recipe["method"]["name"])
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
    if distributed.is_main():
        checkpoint.clean_leftovers(run_dir)
    distributed.barrier()
    dense_params = {n: p.numel() for n, p in loaded.model.named_parameters()}
    name = recipe["method"]["name"]
    method = method_class(recipe, loaded.tokenizer)
    trainers = method.run(methods.RunContext(loaded.model, recipe, train, valid, run_dir, resume))
    loaded.model = trainers[-1].unsharded_model()  # FSDP: gathered on rank 0, None on the others
    if loaded.model is None:  # rank 0 exports and publishes; the others wait for it
        distributed.barrier()
        return None
    extras = method.export(loaded.model)
    # engine runs (LPAF's two stages) each count steps and tokens from zero: count them over the whole run
    history, steps, tokens = [], 0, 0
    for t in trainers:
        history += [{**h, "step": h["step"] + steps, "tokens": h["tokens"] + tokens} for h in t.history]
        steps, tokens = steps + t.step, tokens + t.tokens_seen
    metric = trainers[-1].valid.metric if trainers[-1].valid is not None else None
    report = {
        "command": command, "method": name, "sparsity": None, "keep": extras.get("keep"),
        "base_model": recipe["model"], "model_kind": loaded.kind, "recipe": recipe,
        "steps": sum(t.step for t in trainers), "tokens_seen": sum(t.tokens_seen for t in trainers),
        "seconds": time.perf_counter() - start, "final": history[-1] if history else {},
        "validation_metric": metric,
        "best_val": _best(history, metric), "final_val": next((h[metric] for h in reversed(history) if metric in h), None),
        "parameters": parameter_counts(loaded.model, dense_params, method.target_names()),
        "resumed_from": resume, **extras, **method.report_fields(loaded.model, extras), "versions": output.versions(),
    }
    if loaded.kind == "sequence-classification":
        report["labels"] = [loaded.model.config.id2label[i] for i in range(loaded.model.config.num_labels)]

    def save_extras(folder: Path) -> None:
        if history:
            (folder / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
            plot_curves(history, folder / "training_curves.png", title=f"{name} on {recipe['model']}")

    if not distributed.is_main():  # DDP: rank 0 publishes; the others wait for it
        distributed.barrier()
        return None
    probe = trainers[0].train_set.get([0])["input_ids"][:, :64].to(trainers[0].device)
    output.publish(loaded, out_path, overwrite, recipe, report, _card(report, method), report["parameters"]["targets"],
                   method.sparsity, probe, extra_save=save_extras)
    distributed.barrier()
    return report


def _best(history: list[dict], metric: str | None):
    values = [h[metric] for h in history if metric and metric in h]
    if not values:
        return None
    return max(values) if metric == "val_acc" else min(values)


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


def _card(report: dict, method: methods.Method) -> str:
    r, name = report["recipe"], report["method"]
    m = r["method"]
    what, parts = method.card_lines(report)
    if method.teacher is not None:
        parts.append(f"distillation from {md.code(m['distill']['teacher']) if m['distill']['teacher'] else 'the dense starting model'} "
                     f"(α={m['distill']['alpha']}, T={m['distill']['temperature']})")
    p = report["parameters"]
    summary = [f"{md.code(report['base_model'])} {what} with slimlm's **{name}** recipe: {'; '.join(parts)}.",
               f"Training: {report['steps']} steps, {report['tokens_seen']:,} tokens of {md.code(r['data']['train'])} "
               f"(lr {r['train']['lr']:g}, seed {r['seed']})."]
    if p["targets"]:
        summary.append(f"Target layers keep {p['target_kept']:,} of {p['target_dense']:,} parameters "
                       f"({p['target_fraction']:.1%}); the whole model has {p['model_nonzero']:,} non-zero parameters "
                       f"(dense: {p['model_dense']:,}).")
    summary += method.card_notes(report)
    metric = report["validation_metric"]
    label = {"val_ppl": "validation perplexity", "val_acc": "validation accuracy"}.get(metric)
    results = {f"{label} ({r['data']['valid']})": report["final_val"]} if report["final_val"] is not None else {}
    auto = "AutoModelForCausalLM" if report["model_kind"] == "causal-lm" else "AutoModelForSequenceClassification"
    slimlm_only = method.slimlm_only(report)
    if slimlm_only:
        how = "import slimlm\nmodel = slimlm.load(\"PATH\")  # a transformers model with the layers rebuilt"
    else:
        how = f"from transformers import {auto}\nmodel = {auto}.from_pretrained(\"PATH\")"
    tags = ["slimlm", name] + ([f"sparsity-{report['sparsity'].replace(':', '-')}"] if report["sparsity"] else [])
    return output.model_card(f"{report['base_model']} — {name}", report, summary, results, how, tags, slimlm_only)
