"""One-shot pruning: `oneshot(model, ...)` on an in-memory model (the public `slimlm.oneshot`), and the
job around it: load, calibrate, evaluate, prune with that same function, publish.

The job is used by `slimlm prune`, `slimlm demo` and benchmarks/oneshot.py; settings are a plain dict so
that they can be written back as YAML exactly as they were resolved. The module itself is callable:
`slimlm.oneshot(model, tokenizer, ...)` calls `oneshot` (see the end of the file).
"""
from __future__ import annotations

import os
import sys
import time
import types

import torch
from torch import nn

from . import data, devices, models, output
from .errors import SlimlmError
from .evaluate import perplexity
from .inspect import layer_stats, totals
from .prune import METHODS, prune
from .sparsity import parse_sparsity

DEFAULTS = {
    "model": None, "method": "wanda", "sparsity": "2:4", "calib": None, "nsamples": 128, "seqlen": None,
    "seed": 0, "include": None, "ignore": None, "skip_indivisible": False, "dtype": "float32",
    "device": "auto", "blocksize": 128, "percdamp": 0.01, "eval": None, "eval_dense": False,
    "eval_seqlen": None, "eval_windows": None,
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
                      max_windows=settings["eval_windows"])


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
    windows = calibration = None
    if settings["method"] != "magnitude":
        if not settings["calib"]:
            raise SlimlmError(f"--method {settings['method']} needs calibration data: pass --calib")
        windows, calibration = token_windows(loaded.model, loaded.tokenizer, settings["calib"], settings["nsamples"],
                                             settings["seqlen"], settings["seed"])

    evaluation = {}
    eval_stream = data.load_tokens(loaded.tokenizer, settings["eval"]) if settings["eval"] else None
    if eval_stream is not None and settings["eval_dense"]:
        evaluation["dense"] = evaluate(loaded, eval_stream, settings)

    keys = ("method", "sparsity", "nsamples", "seqlen", "seed", "include", "ignore", "skip_indivisible", "blocksize",
            "percdamp")
    pruned, targets = _oneshot(loaded.model, loaded.tokenizer, calib=windows, **{k: settings[k] for k in keys})
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
    return report


# ---------------------------------------------------------------------------------------------
# The in-memory API: slimlm.oneshot(model, ...), the one code path of `slimlm prune` as well

def oneshot(model: nn.Module, tokenizer=None, method: str = "wanda", sparsity: str = "2:4", calib=None,
            nsamples: int = 128, seqlen: int | None = None, seed: int = 0, include: list[str] | None = None,
            ignore: list[str] | None = None, skip_indivisible: bool = False, blocksize: int = 128,
            percdamp: float = 0.01) -> dict:
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

    Returns the report: method, sparsity, prune_seconds, skipped_layers, totals (target layers,
    parameters, non-zeros, sparsity), layers (per layer: name, shape, sparsity, 2:4/4:8 validity, stored
    weights) and calibration (data, windows, seqlen, seed; None for magnitude). Given the same model,
    data and seed, the weights are bitwise those that `slimlm prune` writes. Raises SlimlmError on bad input.
    """
    return _oneshot(model, tokenizer, method, sparsity, calib, nsamples, seqlen, seed, include, ignore,
                    skip_indivisible, blocksize, percdamp)[0]


def _oneshot(model, tokenizer, method, sparsity, calib, nsamples, seqlen, seed, include, ignore, skip_indivisible,
             blocksize, percdamp) -> tuple[dict, dict]:
    """slimlm.oneshot, also returning the pruned target layers."""
    pattern = parse_sparsity(sparsity)
    if method not in METHODS:
        raise SlimlmError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    targets = models.find_targets(model, include, ignore)
    targets, skipped = models.target_layers(model, targets, pattern.m, skip_indivisible)
    windows, calibration = None, None
    if method != "magnitude":
        if calib is None or (isinstance(calib, (str, list, tuple)) and not calib):
            raise SlimlmError(f"method '{method}' needs calibration data: pass calib= (texts, a data file or "
                              "token windows), or use method='magnitude'")
        windows, calibration = token_windows(model, tokenizer, calib, nsamples, seqlen, seed)
    start = time.perf_counter()
    prune(model, targets, method, pattern, windows, blocksize, percdamp)
    report = {"method": method, "sparsity": str(pattern), "prune_seconds": time.perf_counter() - start,
              "skipped_layers": skipped, "totals": totals(model, targets), "layers": layer_stats(targets, ranks=False),
              "calibration": calibration}
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
        results[f"perplexity ({name}, {ev['data']}, {ev['windows']}x{ev['seqlen']} tokens)"] = ev["perplexity"]
    auto = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification"}
    cls = auto.get(report["model_kind"], "AutoModel")
    how = (f"from transformers import {cls}, AutoTokenizer\n"
           f"model = {cls}.from_pretrained(\"PATH\")  # a plain checkpoint, zeros stored densely\n"
           "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")")
    tags = ["slimlm", "pruning", f"{report['method']}", f"sparsity-{report['sparsity'].replace(':', '-')}"]
    return output.model_card(f"{report['base_model']} — {report['method']} {report['sparsity']}",
                             report, summary, results, how, tags)


class _CallableModule(types.ModuleType):
    """`slimlm.oneshot` is this module (the `slimlm prune` job imports it as `oneshot`) and, called,
    the function `oneshot` above: slimlm.oneshot(model, tokenizer, ...)."""

    def __call__(self, *args, **kwargs) -> dict:
        return oneshot(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__wrapped__ = oneshot  # inspect.signature(slimlm.oneshot) shows the function's parameters
