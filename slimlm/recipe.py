"""YAML recipes: built-in names or files, `key.sub=value` overrides, validation against DEFAULTS.

Every key a recipe may set appears in DEFAULTS with its default value; the default's type is the
key's type (None means "text or null"). Unknown keys and wrong types are errors that name the key.
"""
from __future__ import annotations

import copy
import difflib
import math
from importlib import resources
from pathlib import Path

import yaml

from .errors import SlimlmError, reading

DEFAULTS = {
    "model": "smollm2-135m",
    "seed": 0,
    # text data is packed into windows of seqlen tokens; labeled JSONL (classifiers) is cut at max_length.
    # Training text: each document followed by the model's EOS (separator: eos) or joined by a blank line
    # (text, the protocol validation and calibration always use); text_field names the text of .jsonl,
    # .parquet and datasets; a streamed dataset is read as it arrives, max_tokens (0: all) of it.
    # Tokens are cached in cache_dir (null: $SLIMLM_TOKEN_CACHE or ~/.cache/slimlm/tokens; off: no cache)
    "data": {"train": None, "valid": None, "seqlen": 256, "eval_windows": 16, "max_length": 128,
             "separator": "eos", "text_field": "text", "streaming": False, "max_tokens": 0, "cache_dir": None},
    "train": {
        "steps": 100, "batch_size": 4, "grad_accum": 1, "lr": 2e-4, "min_lr_ratio": 0.1,
        # auto: warmup_fraction of the steps (train/budget.py)
        "warmup_steps": "auto", "warmup_fraction": 0.05,
        # weight decay applies to matrices only (not to norms, biases or other 1-D parameters)
        "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "grad_clip": 1.0,
        "bf16": "auto",  # auto: bf16 autocast where the device computes bf16 natively (CUDA, avx512_bf16/amx CPUs)
        "grad_checkpointing": False, "eval_every": 50, "save_every": 50, "keep_checkpoints": 2,
        "log_every": 1, "tensorboard": False,
        "device": "auto",  # auto: a CUDA GPU when there is one, else the CPU
    },
    # under torchrun: ddp (every rank holds the model) or fsdp (FSDP2 fully_shard: parameters, gradients
    # and optimizer states sharded by rows); bf16 mixed precision and CPU offload are FSDP's
    "parallel": {"strategy": "ddp", "mixed_precision": "none", "cpu_offload": False, "shard_teacher": False},
    "method": {
        "name": "ast",
        "sparsity": "2:4",
        "init": "wanda",              # the first mask: a one-shot method (wanda | sparsegpt) or magnitude
        "init_pruned": "dense",       # what weights outside a one-shot mask start as: dense (they can come back) | zero
        "calib": None, "nsamples": 32,  # calibration for init: wanda | sparsegpt
        "include": None, "ignore": None,
        "mask_update": "adaptive",    # adaptive (AST) | fixed (naive) | gradual (GMP)
        # AST's delta-t: optimizer steps between mask refreshes; auto: mask_interval_fraction of the run,
        # at least mask_interval_min. No refresh in the last delta-t steps (the published mask is trained)
        "mask_interval": "auto", "mask_interval_fraction": 0.05, "mask_interval_min": 2,
        # refresh score: magnitude |W|, activation |W|*||x|| (input norms from the calibration data), or auto
        # (activation after a wanda/sparsegpt init, magnitude otherwise); a pruned weight must score
        # (1 + mask_margin) times a kept one to displace it
        "mask_score": "auto", "mask_margin": 0.05,
        "ste": True,                  # straight-through gradient to pruned weights
        "gradual_fraction": 0.5,      # GMP: fraction of training over which sparsity ramps up (cubic)
        # SR-STE decay of pruned weights, ramped over ramp_fraction of the run. decoupled: W <- W - lr*lambda*(~m*W)
        # outside Adam; second-moment (the paper's) / gradient: inside Adam. lambda_max auto (decoupled
        # only): the lambda that shrinks a pruned weight by target_shrink by the last mask refresh
        "decay": {"mode": "decoupled", "lambda_max": "auto", "target_shrink": 0.5, "ramp_fraction": 0.25},
        # teacher_dtype auto: bfloat16 where training runs in bf16, else float32
        "distill": {"enabled": True, "teacher": None, "alpha": 0.67, "temperature": 2.0, "kl": "forward", "teacher_dtype": "auto",
                    # causal LMs: the loss over this many tokens at a time, logits never in full (0: all at once)
                    "chunk_tokens": 256},
        "slorb": {"enabled": False, "group_size": 16, "init": "mean", "train_x": False},
        # movement and lpaf: the fraction of target-layer parameters kept (unstructured / low-rank budget)
        "keep": 0.5,
        # first-order pruning: keep falls from 1 to `keep` on a cubic schedule that starts after the lr
        # warm-up (and at least start_fraction of the steps) and ends before the last hold_fraction, where
        # the mask is fixed; masks from scores (methods/movement.py) every mask_interval steps
        "movement": {"score": "learned", "score_lr": 1.0e-2, "score_init": "zero", "threshold": "matrix", "start_fraction": 0.1,
                     "hold_fraction": 0.2, "mask_interval": 1, "beta1": 0.85, "beta2": 0.95, "uncertainty": True},
        # lpaf: prune (movement over prune_fraction of the steps, or none: factorize the dense weights),
        # factorize, then mixed-rank fine-tuning for the rest
        "lpaf": {"prune": "movement", "prune_fraction": 0.5, "factorization": "activation", "svd_iters": 20,
                 "pruned_weight": 0.1,
                 "mixed": "probability", "mixed_fraction": 0.5, "calib_batches": 8, "merge": False},
    },
}

CHOICES = {
    "data.separator": ("eos", "text"),
    "parallel.strategy": ("ddp", "fsdp"),
    "parallel.mixed_precision": ("none", "bf16"),
    "method.name": ("ast", "naive", "gmp", "finetune", "movement", "lpaf"),
    "method.init": ("magnitude", "wanda", "sparsegpt"),
    "method.mask_update": ("adaptive", "fixed", "gradual"),
    "method.init_pruned": ("dense", "zero"),
    "method.mask_score": ("auto", "magnitude", "activation"),
    "method.decay.mode": ("decoupled", "second-moment", "gradient", "none"),
    "method.distill.kl": ("forward", "reverse"),
    "method.distill.teacher_dtype": ("auto", "float32", "bfloat16"),
    "method.slorb.init": ("mean", "random"),
    "method.lpaf.prune": ("movement", "none"),
    "method.lpaf.factorization": ("svd", "fisher", "sparsity-aware", "activation"),
    "method.movement.score": ("learned", "sensitivity", "magnitude"),
    "method.movement.threshold": ("matrix", "global"),
    "method.movement.score_init": ("zero", "magnitude"),
    "method.lpaf.mixed": ("probability", "rank", "none"),
}

# keys that may differ between a run and its resume (they do not change the trajectory)
RESUME_FREE = {"train.eval_every", "train.save_every", "train.keep_checkpoints",
               "train.log_every", "train.tensorboard", "data.eval_windows", "data.valid", "data.cache_dir",
               "parallel.strategy", "parallel.cpu_offload", "parallel.shard_teacher"}
# keys a resume may change although they change the trajectory: the way out of a divergence (said on resume)
RESUME_ADJUSTABLE = {"train.lr"}


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("slimlm.recipes").iterdir() if p.name.endswith(".yaml"))


def summary(name: str) -> str:
    """One line about a built-in recipe: the first sentence of its leading comment (the part before its
    first colon when the sentence is long)."""
    lines = []
    for line in (resources.files("slimlm.recipes") / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    first = " ".join(lines).split(". ")[0].rstrip(".")
    return first.split(": ")[0] if len(first) > 100 else first


def read_recipe(spec: str) -> dict:
    path = Path(spec).expanduser()
    if path.is_file():
        with reading(path, "recipe", "save it as UTF-8 YAML"):
            text = path.read_text(encoding="utf-8")
    elif spec in builtin_names():
        text = (resources.files("slimlm.recipes") / f"{spec}.yaml").read_text()
    else:
        raise SlimlmError(f"recipe '{spec}' not found: give a YAML file or one of {', '.join(builtin_names())}")
    try:
        recipe = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise SlimlmError(f"recipe '{spec}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise SlimlmError(f"recipe '{spec}' must be a mapping of keys to values")
    return recipe


# keys that take 'auto' (derived from the run, train/budget.py) or a value of the sample's type
AUTO = {"train.warmup_steps": 0, "train.bf16": False, "method.mask_interval": 0, "method.decay.lambda_max": 0.0}


def _check(value, default, key: str):
    """Return value converted to the default's type, or raise naming the key."""
    if key in AUTO:
        if value == "auto":
            return value
        try:
            return _check(value, AUTO[key], key + " ")
        except SlimlmError:
            raise SlimlmError(f"recipe key '{key}' must be auto or {_kind(AUTO[key])}, got {value!r}") from None
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise SlimlmError(f"recipe key '{key}' must be a section (a mapping), got {value!r}")
        return value
    if default is None or isinstance(default, str):
        if value is None or isinstance(value, str):
            ok = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            ok = value  # include/ignore take lists of regexes
        else:
            raise SlimlmError(f"recipe key '{key}' must be text, got {value!r}")
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise SlimlmError(f"recipe key '{key}' must be true or false, got {value!r}")
        ok = value
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SlimlmError(f"recipe key '{key}' must be an integer, got {value!r}")
        ok = value
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SlimlmError(f"recipe key '{key}' must be a number, got {value!r}")
        ok = float(value)
    elif isinstance(default, list):
        if not isinstance(value, list) or len(value) != len(default):
            raise SlimlmError(f"recipe key '{key}' must be a list of {len(default)} numbers, got {value!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise SlimlmError(f"recipe key '{key}' must be a list of {len(default)} numbers, got {value!r}")
        ok = [float(v) for v in value]
    else:
        ok = value
    if key in CHOICES and ok not in CHOICES[key]:
        raise SlimlmError(f"recipe key '{key}' must be one of {', '.join(CHOICES[key])}, got {ok!r}")
    return ok


def _kind(sample) -> str:
    return {bool: "true or false", int: "an integer", float: "a number"}[type(sample)]


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    for key, value in update.items():
        full = f"{prefix}{key}"
        if key not in base:
            raise unknown_key(full)
        value = _check(value, base[key], full)
        base[key] = _merge(base[key], value, full + ".") if isinstance(base[key], dict) else value
    return base


def unknown_key(key: str) -> SlimlmError:
    """The error for a key DEFAULTS does not have, naming the closest known key if one is close."""
    known = list(flatten(DEFAULTS, sections=True))
    section, _, name = key.rpartition(".")
    if section and section not in known:  # a misspelt section: trian.steps
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    else:  # a misspelt name in its section: train.warmup_step
        siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section}
        close = [siblings[n] for n in difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)]
    if not close:  # the right name in another section (or in none): steps -> train.steps
        names: dict[str, str] = {}
        for k in known:  # a name in several sections: the outermost
            names.setdefault(k.rpartition(".")[2], k)
        close = [names[n] for n in difflib.get_close_matches(name, names, n=1, cutoff=0.8)]
    hint = f": did you mean '{close[0]}'?" if close else ""
    return SlimlmError(f"unknown recipe key '{key}'{hint}")


def _parse_override(item: str) -> dict:
    if "=" not in item:
        raise SlimlmError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    node, parts = DEFAULTS, key.split(".")
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            raise unknown_key(key)
        node = node[part]
    # text keys keep the raw string (YAML would read 2:4 as a base-60 integer)
    text = (node is None or isinstance(node, str)) and key not in AUTO
    try:
        value = raw if text and not raw.startswith("[") else yaml.safe_load(raw)
    except yaml.YAMLError as err:  # train.betas=[0.9,
        raise SlimlmError(f"override '{item}': the value is not valid YAML ({str(err).splitlines()[0]})") from None
    if raw in ("null", "~"):
        value = None
    nested = value
    for part in reversed(parts):
        nested = {part: nested}
    return nested


# numbers that must lie in a range: key -> (low, high, low inclusive)
RANGES = {"method.keep": (0.0, 1.0, False), "method.lpaf.prune_fraction": (0.0, 1.0, True),
          "method.lpaf.mixed_fraction": (0.0, 1.0, True), "method.movement.start_fraction": (0.0, 1.0, True),
          "method.movement.hold_fraction": (0.0, 1.0, True), "method.movement.beta1": (0.0, 1.0, False),
          "method.movement.beta2": (0.0, 1.0, False),
          "method.lpaf.pruned_weight": (0.0, 1.0, True), "method.decay.target_shrink": (0.0, 1.0, False),
          "method.mask_interval_fraction": (0.0, 1.0, False), "train.warmup_fraction": (0.0, 1.0, True),
          "method.mask_margin": (0.0, math.inf, True), "method.mask_interval_min": (1, math.inf, True),
          "method.mask_interval": (1, math.inf, True), "train.warmup_steps": (0, math.inf, True),
          "method.decay.lambda_max": (0.0, math.inf, True), "method.movement.score_lr": (0.0, math.inf, False),
          # counts and intervals: zero or negative would divide by zero, loop forever or silently do nothing
          "data.seqlen": (2, math.inf, True), "data.eval_windows": (1, math.inf, True),
          "data.max_length": (2, math.inf, True), "train.steps": (1, math.inf, True),
          "train.batch_size": (1, math.inf, True), "train.grad_accum": (1, math.inf, True),
          "train.eval_every": (1, math.inf, True), "train.save_every": (1, math.inf, True),
          "train.keep_checkpoints": (1, math.inf, True), "train.log_every": (1, math.inf, True),
          "method.nsamples": (1, math.inf, True), "method.slorb.group_size": (1, math.inf, True),
          "method.movement.mask_interval": (1, math.inf, True), "method.lpaf.svd_iters": (1, math.inf, True),
          "method.lpaf.calib_batches": (1, math.inf, True), "method.distill.chunk_tokens": (0, math.inf, True),
          # rates and weights: a negative learning rate climbs the loss, eps 0 divides by zero
          "train.lr": (0.0, math.inf, False), "train.eps": (0.0, math.inf, False),
          "train.min_lr_ratio": (0.0, 1.0, True), "train.weight_decay": (0.0, math.inf, True),
          "train.grad_clip": (0.0, math.inf, True), "method.distill.alpha": (0.0, 1.0, True),
          "method.distill.temperature": (0.0, math.inf, False), "method.gradual_fraction": (0.0, 1.0, True),
          "method.decay.ramp_fraction": (0.0, math.inf, True)}  # past 1: warned (budget.py)


def resolve(spec: str, overrides: list[str] | None = None) -> dict:
    recipe = _merge(copy.deepcopy(DEFAULTS), read_recipe(spec))
    for item in overrides or []:
        recipe = _merge(recipe, _parse_override(item))
    flat = flatten(recipe)
    if not flat["model"] or not isinstance(flat["model"], str):
        raise SlimlmError("recipe key 'model' must name a model (built-in name, folder, .gguf file or hub id), "
                          f"got {flat['model']!r}")
    if not all(0.0 <= b < 1.0 for b in flat["train.betas"]):
        raise SlimlmError(f"recipe key 'train.betas' must be two numbers in [0, 1), got {flat['train.betas']}")
    for key, (low, high, inclusive) in RANGES.items():
        value = flat[key]
        if value == "auto":
            continue
        if value > high or value < low or (value == low and not inclusive):
            raise SlimlmError(f"recipe key '{key}' must be in {'[' if inclusive else '('}{low}, {high}], got {value}")
    warmup, steps = flat["train.warmup_steps"], flat["train.steps"]
    if warmup != "auto" and warmup > steps:
        origin = "" if any(o.startswith("train.warmup_steps=") for o in overrides or []) else f" (from recipe {spec})"
        raise SlimlmError(f"train.warmup_steps={warmup}{origin} is more than train.steps={steps}: the learning rate "
                          "would never reach train.lr; set train.warmup_steps to at most train.steps, or to auto")
    return recipe


def flatten(recipe: dict, prefix: str = "", sections: bool = False) -> dict:
    """{dotted key: value} of every leaf (and with `sections`, of every section too)."""
    out = {}
    for k, v in recipe.items():
        if isinstance(v, dict):
            if sections:
                out[f"{prefix}{k}"] = v
            out.update(flatten(v, f"{prefix}{k}.", sections))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(a: dict, b: dict) -> list[str]:
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k) and k not in RESUME_FREE | RESUME_ADJUSTABLE)
