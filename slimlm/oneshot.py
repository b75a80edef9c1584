"""The one-shot pruning job: load, select targets, calibrate, prune, evaluate, publish.

Used by `slimlm prune`, `slimlm demo` and benchmarks/oneshot.py; settings are a plain dict so that
they can be written back as YAML exactly as they were resolved.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict

import torch

from . import data, devices, models, output
from .errors import SlimlmError
from .eval.perplexity import perplexity
from .eval.layers import layer_stats, totals
from .prune import METHODS, prune
from .prune.reconstruct import Reconstruction
from .ops.sparsity import parse_sparsity

DEFAULTS = {
    "model": None, "method": "wanda", "sparsity": "2:4", "calib": None, "nsamples": 128, "seqlen": None,
    "seed": 0, "include": None, "ignore": None, "skip_indivisible": False, "dtype": "float32",
    "device": "auto", "blocksize": 128, "percdamp": 0.01, "eval": None, "eval_dense": False,
    "eval_seqlen": None, "eval_windows": None, "eval_bos": "auto",
    # block-wise reconstruction after the one-shot prune (prune/reconstruct.py)
    "reconstruct": False, "reconstruct_steps": 64, "reconstruct_batch": 4, "reconstruct_lr": 1e-4,
    "reconstruct_mask": "fixed", "reconstruct_target": "dense",
}
IDENTITY = ("model", "method", "sparsity", "calib", "nsamples", "seqlen", "seed", "include", "ignore", "dtype",
            "blocksize", "percdamp")  # what a resumed reconstruction must share with the run it continues


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

    rc = _reconstruction(settings, loaded)
    windows = None
    if settings["method"] != "magnitude" or rc is not None:
        if not settings["calib"]:
            raise SlimlmError(f"--method {settings['method']}{' with --reconstruct' if rc else ''} needs calibration "
                              "data: pass --calib")
        calib = data.load_tokens(loaded.tokenizer, settings["calib"], split="train")
        windows = data.calibration_windows(calib, settings["nsamples"], settings["seqlen"], settings["seed"])

    evaluation = {}
    eval_stream = data.load_tokens(loaded.tokenizer, settings["eval"]) if settings["eval"] else None
    if eval_stream is not None and settings["eval_dense"]:
        evaluation["dense"] = evaluate(loaded, eval_stream, settings)

    start = time.perf_counter()
    checkpoints = out_path.with_name(out_path.name + ".checkpoints") if out_path is not None and rc else None
    blocks = prune(loaded.model, targets, settings["method"], sparsity, windows, settings["blocksize"],
                   settings["percdamp"], reconstruction=rc,
                   **({"seed": settings["seed"], "checkpoint_dir": checkpoints,
                       "identity": {k: settings[k] for k in IDENTITY}} if rc else {}))
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
    if blocks is not None:
        report["reconstruction"] = {**asdict(rc), "blocks": blocks,
                                    "mean_error_before": sum(b["error_before"] for b in blocks) / len(blocks),
                                    "mean_error_after": sum(b["error_after"] for b in blocks) / len(blocks)}
    if out_path is not None:
        probe = (windows[0] if windows is not None else torch.arange(32))[:64].unsqueeze(0)
        probe = probe.to(next(loaded.model.parameters()).device)
        output.publish(loaded, out_path, overwrite, settings, report, _card(report), list(targets), sparsity, probe)
        if checkpoints is not None:
            shutil.rmtree(checkpoints, ignore_errors=True)  # published: the per-block states are no longer needed
    return report


def _reconstruction(settings: dict, loaded) -> Reconstruction | None:
    if not settings["reconstruct"]:
        return None
    from .train.budget import use_bf16

    return Reconstruction(steps=settings["reconstruct_steps"], batch=settings["reconstruct_batch"],
                          lr=settings["reconstruct_lr"], mask=settings["reconstruct_mask"],
                          target=settings["reconstruct_target"],
                          bf16=use_bf16("auto", next(loaded.model.parameters()).device))


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
    rec = report.get("reconstruction")
    if rec:
        summary.append(f"Then each block was trained for {rec['steps']} steps ({rec['batch']} windows each, lr "
                       f"{rec['lr']:g}, {rec['mask']} masks) to reproduce the dense model's "
                       f"{'activations' if rec['target'] == 'dense' else 'block outputs'}: relative output error "
                       f"{rec['mean_error_before']:.3g} → {rec['mean_error_after']:.3g} (mean over blocks).")
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
