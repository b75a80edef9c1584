"""One-shot pruning: `oneshot(model, ...)` on an in-memory model (the public `slimlm.oneshot`), and the
`slimlm prune` job around it: load, calibrate, evaluate, prune with that same function (optionally
followed by block-wise reconstruction, prune/reconstruct.py), publish.

The job is used by `slimlm prune`, `slimlm demo` and the benchmarks; settings are a plain dict so that
they can be written back as YAML exactly as they were resolved.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import data, devices, models, output
from . import markdown as md
from .errors import SlimlmError
from .eval.layers import layer_stats, totals
from .eval.perplexity import perplexity
from .ops.sparsity import parse_sparsity
from .prune import METHODS, prune
from .prune.reconstruct import Reconstruction

DEFAULTS = {
    "model": None, "method": "wanda", "sparsity": "2:4", "calib": None, "nsamples": 128, "seqlen": None,
    "seed": 0, "include": None, "ignore": None, "skip_indivisible": False, "dtype": "float32",
    "device": "auto", "blocksize": 128, "percdamp": 0.01, "eval": None, "eval_dense": False,
    "eval_seqlen": None, "eval_windows": None, "eval_bos": "auto",
    # block-wise reconstruction after the one-shot prune (prune/reconstruct.py)
    "reconstruct": False, "reconstruct_steps": 64, "reconstruct_batch": 4, "reconstruct_lr": 5e-3,
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
    # fail on unmatched or indivisible layers, then on the calibration data, before any evaluation
    models.target_layers(loaded.model, models.find_targets(loaded.model, settings["include"], settings["ignore"]),
                         sparsity.m, settings["skip_indivisible"])
    rc = _reconstruction(settings, loaded)
    windows = calibration = None
    if settings["method"] != "magnitude" or rc is not None:
        if not settings["calib"]:
            raise SlimlmError(f"--method {settings['method']}{' with --reconstruct' if rc else ''} needs calibration "
                              "data: pass --calib")
        windows, calibration = token_windows(loaded.model, loaded.tokenizer, settings["calib"], settings["nsamples"],
                                             settings["seqlen"], settings["seed"])

    evaluation = {}
    eval_stream = data.load_tokens(loaded.tokenizer, settings["eval"]) if settings["eval"] else None
    if eval_stream is not None and settings["eval_dense"]:
        evaluation["dense"] = evaluate(loaded, eval_stream, settings)

    keys = ("method", "sparsity", "nsamples", "seqlen", "seed", "include", "ignore", "skip_indivisible", "blocksize",
            "percdamp")
    checkpoints = out_path.with_name(out_path.name + ".checkpoints") if out_path is not None and rc else None
    pruned, targets = _oneshot(loaded.model, loaded.tokenizer, calib=windows, **{k: settings[k] for k in keys},
                               reconstruction=rc, checkpoint_dir=checkpoints,
                               identity={k: settings[k] for k in IDENTITY})
    pruned["calibration"] = calibration

    if eval_stream is not None:
        evaluation["pruned"] = evaluate(loaded, eval_stream, settings)

    report = {
        "command": "prune", "method": settings["method"], "sparsity": pruned["sparsity"],
        "base_model": settings["model"], "settings": settings, **pruned, "evaluation": evaluation,
        "model_kind": loaded.kind, "versions": output.versions(),
    }
    if out_path is not None:
        probe = (windows[0] if windows is not None else torch.arange(32))[:64].unsqueeze(0)
        probe = probe.to(next(loaded.model.parameters()).device)
        output.publish(loaded, out_path, overwrite, settings, report, _card(report), list(targets), sparsity, probe)
        if checkpoints is not None:
            shutil.rmtree(checkpoints, ignore_errors=True)  # published: the per-block states are no longer needed
    return report


# ---------------------------------------------------------------------------------------------
# The in-memory API: slimlm.oneshot(model, ...), the one code path of `slimlm prune` as well

def oneshot(model: nn.Module, tokenizer=None, method: str = "wanda", sparsity: str = "2:4", calib=None,
            nsamples: int = 128, seqlen: int | None = None, seed: int = 0, include: list[str] | None = None,
            ignore: list[str] | None = None, skip_indivisible: bool = False, blocksize: int = 128,
            percdamp: float = 0.01, reconstruction: Reconstruction | None = None) -> dict:
    """Prune the target layers of an in-memory transformers model in place, as `slimlm prune` does.

    method: "magnitude" (no data), "wanda" or "sparsegpt" (calibration data needed).
    sparsity: "2:4", "4:8" (any N:M) or a fraction of pruned weights ("0.5").
    calib: the calibration data of wanda/sparsegpt, one of
      - a list of strings: joined with a blank line, tokenized once with `tokenizer`;
      - a path or dataset spec, as `--calib` takes it (.txt, .jsonl, "name[:config[:split]]",
        "python-docs:train"), tokenized with `tokenizer`;
      - a 2-D LongTensor of token windows (windows, seqlen), used as given (nsamples, seqlen, seed unused).
      From text, `nsamples` windows of `seqlen` tokens (default 2048, or the model's position table when
      shorter) are drawn at random offsets with `seed`, as the SparseGPT/Wanda reference code draws them.
    include, ignore: regexes over module names; by default every Linear (GPT-2: Conv1D) inside the
      transformer blocks is a target, embeddings and the LM head stay dense.
    skip_indivisible: leave layers whose input width is not divisible by M dense instead of failing.
    blocksize, percdamp: SparseGPT's column block and Hessian dampening.
    reconstruction: then train each block to reproduce the dense outputs on the calibration windows
      (`slimlm.prune.reconstruct.Reconstruction`: steps, batch, lr, mask, target); the report gains
      `reconstruction` with each block's relative output error before and after.

    Returns the report: method, sparsity, prune_seconds, skipped_layers, totals (target layers,
    parameters, non-zeros, sparsity), layers (per layer: name, shape, sparsity, 2:4/4:8 validity, stored
    weights) and calibration (data, windows, seqlen, seed; None for magnitude). Given the same model,
    data and seed, the weights are bitwise those that `slimlm prune` writes. Raises SlimlmError on bad input.
    """
    return _oneshot(model, tokenizer, method, sparsity, calib, nsamples, seqlen, seed, include, ignore,
                    skip_indivisible, blocksize, percdamp, reconstruction)[0]


def _oneshot(model, tokenizer, method, sparsity, calib, nsamples, seqlen, seed, include, ignore, skip_indivisible,
             blocksize, percdamp, reconstruction=None, checkpoint_dir: Path | None = None,
             identity: dict | None = None) -> tuple[dict, dict]:
    """slimlm.oneshot, also returning the pruned target layers (`checkpoint_dir`, `identity`: a
    reconstruction's per-block states, and what a resume must share with the run that wrote them)."""
    pattern = parse_sparsity(sparsity)
    if method not in METHODS:
        raise SlimlmError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    targets = models.find_targets(model, include, ignore)
    targets, skipped = models.target_layers(model, targets, pattern.m, skip_indivisible)
    windows, calibration = None, None
    if method != "magnitude" or reconstruction is not None:
        if calib is None or (isinstance(calib, (str, list, tuple)) and not calib):
            raise SlimlmError(f"method '{method}' needs calibration data: pass calib= (texts, a data file or "
                              "token windows), or use method='magnitude'")
        windows, calibration = token_windows(model, tokenizer, calib, nsamples, seqlen, seed)
    start = time.perf_counter()
    blocks = prune(model, targets, method, pattern, windows, blocksize, percdamp, reconstruction=reconstruction,
                   **({"seed": seed, "checkpoint_dir": checkpoint_dir, "identity": identity} if reconstruction else {}))
    report = {"method": method, "sparsity": str(pattern), "prune_seconds": time.perf_counter() - start,
              "skipped_layers": skipped, "totals": totals(model, targets), "layers": layer_stats(targets, ranks=False),
              "calibration": calibration}
    if blocks is not None:
        report["reconstruction"] = {**asdict(reconstruction), "blocks": blocks,
                                    "mean_error_before": sum(b["error_before"] for b in blocks) / len(blocks),
                                    "mean_error_after": sum(b["error_after"] for b in blocks) / len(blocks)}
    return report, targets


def token_windows(model: nn.Module, tokenizer, calib, nsamples: int = 128, seqlen: int | None = None,
                  seed: int = 0) -> tuple[torch.Tensor, dict]:
    """(windows, description) of calibration data given as slimlm.oneshot's `calib` (also used by
    slimlm.factorize): texts, a data spec, or a 2-D tensor of token ids taken as it is."""
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.is_floating_point() or calib.is_complex():
            raise SlimlmError(f"token windows must be a 2-D integer tensor (windows, seqlen), got "
                              f"{calib.dtype} of shape {tuple(calib.shape)}")
        return calib.long(), {"data": "token windows", "windows": calib.shape[0], "seqlen": calib.shape[1],
                              "seed": None}
    texts = isinstance(calib, (list, tuple)) and all(isinstance(t, str) for t in calib)
    if not texts and not isinstance(calib, (str, os.PathLike)):
        raise SlimlmError(f"calibration data must be a list of strings, a data file or dataset spec, or a 2-D "
                          f"tensor of token ids, got {type(calib).__name__}")
    if tokenizer is None:
        raise SlimlmError("calibration text needs the model's tokenizer: pass tokenizer=")
    seqlen = models.fit_seqlen(model.config, seqlen, "seqlen")
    if texts:
        source = f"{len(calib)} text{'s' * (len(calib) != 1)}"
        stream = data.tokenize(tokenizer, "\n\n".join(calib), source)
    else:
        source = str(calib)
        stream = data.load_tokens(tokenizer, source, split="train")
    windows = data.calibration_windows(stream, nsamples, seqlen, seed)
    return windows, {"data": source, "windows": len(windows), "seqlen": seqlen, "seed": seed}


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
        f"{md.code(report['base_model'])} pruned one-shot with **{report['method']}** to **{report['sparsity']}** "
        f"sparsity in {t['target_layers']} target layers ({t['target_sparsity']:.1%} of their "
        f"{t['target_parameters']:,} weights are zero; embeddings and LM head stay dense).",
    ]
    if report["calibration"]:
        c = report["calibration"]
        summary.append(f"Calibration: {c['windows']} windows of {c['seqlen']} tokens from {md.code(c['data'])}, seed {c['seed']}.")
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
