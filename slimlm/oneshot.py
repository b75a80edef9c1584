"""The one-shot pruning job: load, select targets, calibrate, prune, evaluate, publish.

Used by `slimlm prune`, `slimlm demo` and benchmarks/oneshot.py; settings are a plain dict so that
they can be written back as YAML exactly as they were resolved.
"""
from __future__ import annotations

import time

import torch

from . import data, devices, models, output
from .errors import SlimlmError
from .eval.perplexity import perplexity
from .eval.layers import layer_stats, totals
from .prune import METHODS, prune
from .ops.sparsity import parse_sparsity

DEFAULTS = {
    "model": None, "method": "wanda", "sparsity": "2:4", "calib": None, "nsamples": 128, "seqlen": None,
    "seed": 0, "include": None, "ignore": None, "skip_indivisible": False, "dtype": "float32",
    "device": "auto", "blocksize": 128, "percdamp": 0.01, "eval": None, "eval_dense": False,
    "eval_seqlen": None, "eval_windows": None, "eval_bos": "auto",
}


def resolve_settings(defaults: dict = DEFAULTS, **given) -> dict:
    """`defaults` updated with the given settings that are not None (also used by quantize.py)."""
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}")
    return {**defaults, **{k: v for k, v in given.items() if v is not None}}


def fit_windows(loaded, settings: dict) -> None:
    """Calibration and evaluation windows that the model's position table holds (also used by quantize.py)."""
    settings["seqlen"] = models.fit_seqlen(loaded.model.config, settings["seqlen"], "--seqlen")
    if settings["eval_seqlen"] is not None:
        settings["eval_seqlen"] = models.fit_seqlen(loaded.model.config, settings["eval_seqlen"], "--eval-seqlen")


def evaluate(loaded, stream, settings) -> dict:
    """Perplexity with the job's evaluation settings (also used by quantize.py)."""
    if loaded.kind != "causal-lm":
        raise SlimlmError("perplexity needs a causal language model")
    return perplexity(loaded.model, stream, settings["eval_seqlen"] or settings["seqlen"],
                      max_windows=settings["eval_windows"], bos=settings["eval_bos"])


def run(settings: dict, output_dir: str | None = None, overwrite: bool = False) -> dict:
    """Prune as `settings` say; write the output folder if `output_dir` is given. Returns the report."""
    sparsity = parse_sparsity(settings["sparsity"])
    if settings["method"] not in METHODS:
        raise SlimlmError(f"unknown method '{settings['method']}': choose one of {', '.join(METHODS)}")
    out_path = output.check_output_dir(output_dir, overwrite) if output_dir else None
    torch.manual_seed(settings["seed"])
    settings["device"] = devices.resolve(settings["device"], announce=True)
    loaded = models.load(settings["model"], settings["dtype"], settings["device"])
    if settings["calib"] or settings["eval"]:
        fit_windows(loaded, settings)
    targets = models.find_targets(loaded.model, settings["include"], settings["ignore"])
    targets, skipped = models.target_layers(loaded.model, targets, sparsity.m, settings["skip_indivisible"])

    windows = None
    if settings["method"] != "magnitude":
        if not settings["calib"]:
            raise SlimlmError(f"--method {settings['method']} needs calibration data: pass --calib")
        calib = data.load_tokens(loaded.tokenizer, settings["calib"], split="train")
        windows = data.calibration_windows(calib, settings["nsamples"], settings["seqlen"], settings["seed"])

    evaluation = {}
    eval_stream = data.load_tokens(loaded.tokenizer, settings["eval"]) if settings["eval"] else None
    if eval_stream is not None and settings["eval_dense"]:
        evaluation["dense"] = evaluate(loaded, eval_stream, settings)

    start = time.perf_counter()
    prune(loaded.model, targets, settings["method"], sparsity, windows, settings["blocksize"], settings["percdamp"])
    prune_seconds = time.perf_counter() - start

    if eval_stream is not None:
        evaluation["pruned"] = evaluate(loaded, eval_stream, settings)

    layers = layer_stats(targets, ranks=False)
    report = {
        "command": "prune", "method": settings["method"], "sparsity": str(sparsity), "base_model": settings["model"],
        "settings": settings, "prune_seconds": prune_seconds, "skipped_layers": skipped,
        "totals": totals(loaded.model, targets), "layers": layers, "evaluation": evaluation,
        "calibration": None if windows is None else {"data": settings["calib"], "windows": len(windows),
                                                       "seqlen": settings["seqlen"], "seed": settings["seed"]},
        "model_kind": loaded.kind, "versions": output.versions(),
    }
    if out_path is not None:
        probe = (windows[0] if windows is not None else torch.arange(32))[:64].unsqueeze(0)
        probe = probe.to(next(loaded.model.parameters()).device)
        output.publish(loaded, out_path, overwrite, settings, report, _card(report), list(targets), sparsity, probe)
    return report


def bos_label(evaluation: dict) -> str:
    """How a perplexity's windows began, for model cards (also used by quantize.py)."""
    return "BOS per window" if evaluation.get("bos") == "window" else "SparseGPT/Wanda windows"


def _card(report: dict) -> str:
    t = report["totals"]
    summary = [
        f"`{report['base_model']}` pruned one-shot with **{report['method']}** to **{report['sparsity']}** "
        f"sparsity in {t['target_layers']} target layers ({t['target_sparsity']:.1%} of their "
        f"{t['target_parameters']:,} weights are zero; embeddings and LM head stay dense).",
    ]
    if report["calibration"]:
        c = report["calibration"]
        summary.append(f"Calibration: {c['windows']} windows of {c['seqlen']} tokens from `{c['data']}`, seed {c['seed']}.")
    if report["skipped_layers"]:
        summary.append(f"Left dense (width not divisible by M): {', '.join(report['skipped_layers'])}.")
    results = {}
    for name, ev in report["evaluation"].items():
        results[f"perplexity ({name}, {ev['data']}, {ev['windows']}x{ev['seqlen']} tokens, {bos_label(ev)})"] = ev["perplexity"]
    auto = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification"}
    cls = auto.get(report["model_kind"], "AutoModel")
    how = (f"from transformers import {cls}, AutoTokenizer\n"
           f"model = {cls}.from_pretrained(\"PATH\")  # a plain checkpoint, zeros stored densely\n"
           "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")")
    tags = ["slimlm", "pruning", f"{report['method']}", f"sparsity-{report['sparsity'].replace(':', '-')}"]
    return output.model_card(f"{report['base_model']} — {report['method']} {report['sparsity']}",
                             report, summary, results, how, tags)
