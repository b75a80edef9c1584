"""The Python API over in-memory models, next to `slimlm.oneshot` (slimlm/pruning.py):

- `load(path, runtime=True)`: a slimlm output folder with its compressed layers as fast modules;
- `factorize(model, keep, init)`: target layers replaced by low-rank factors (LPAF's initialisations);
- `save(model, path, tokenizer)`: a folder that `load` reads back (and plain transformers refuses when it
  would build the compressed layers with random weights).

slimlm/__init__.py re-exports them; importing `slimlm` imports none of this until it is used.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .runtime import kernels
from .ops import masked
from . import models, output
from .errors import SlimlmError
from .ops.factorized import LowRankLinear, linear_view, replace_module
from .ops.lowrank import FACTORIZATIONS, factorize as factor_matrix, rank_for_budget

log = logging.getLogger("slimlm")


def load(path: str, dtype: str = "float32", device: str = "cpu", runtime: bool = False) -> nn.Module:
    """Load a slimlm output folder (or any model slimlm accepts: built-in name, HF folder, .gguf, hub id)
    as a transformers model in eval mode. Low-rank layers, SLoRB side paths and quantized codes are
    rebuilt; without `runtime` quantized layers hold their dequantized float weights.

    runtime=True: each compressed target layer is replaced by its fast runnable form from
    slimlm/runtime/kernels.py, the form `slimlm bench` times, and `model.slimlm_backends` says which backend each
    target layer got ({layer name: backend}; also logged at INFO on the "slimlm" logger):

    - int8, one scale per output channel, on CPU: int8 codes + scales, `torch._weight_int8pack_mm`;
    - int4 in groups of 32/64/128/256, on CPU: packed nibbles, `torch._weight_int4pack_mm_for_cpu`;
    - 2:4 sparse, on CUDA with dtype="float16" or "bfloat16": PyTorch semi-structured sparse tensors
      (cuSPARSELt or CUTLASS), about 56% of the fp16 weight memory;
    - low-rank (LPAF): already two thin matmuls;
    - anything else stays as it is, and its backend says why: 2:4 on CPU (PyTorch has no CPU 2:4
      kernel) or in float32, group-wise int8, int4 with other groups, quantized layers on CUDA (run
      dequantized), dense layers.

    What it buys, as measured by `slimlm bench` (docs/benchmarks.md, 2 CPU cores): int8/int4 hold
    2.4x/3.0x less weight memory but PyTorch's CPU weight-only kernels are far *slower* than its fp32
    matmul (prefill 17-25x slower, decode at batch 1 0.5-0.7x the dense speed); low-rank at a 50%
    budget is faster (prefill 1.3-1.4x) and smaller; 2:4 gains neither speed nor memory on CPU. The
    2:4 CUDA path is implemented but was not measured. A runtime model is for inference on the device it
    was loaded on: it has no gradients, and moving it to another device breaks the CPU int4 packing.
    """
    loaded = models.load(path, dtype=dtype, device=device)
    model = loaded.model
    if runtime:
        plan = kernels.plan_layers(model, models.resolve(path)[0], fallback=True)
        kernels.to_runnable(model, plan)
        model.slimlm_backends = {layer["name"]: layer["backend"] for layer in plan}
        log.info("slimlm.load(%s, runtime=True): %s", path, kernels.backend_summary(plan))
    return model


def save(model: nn.Module, path: str | Path, tokenizer=None) -> None:
    """Write an in-memory model (pruned, factorized) as an HF folder (safetensors) that `slimlm.load`
    reads. A factorized model's folder is marked so that plain transformers refuses it instead of
    loading its low-rank layers with random weights; a pruned one stays a stock checkpoint."""
    if any(isinstance(m, kernels._RowsLinear) for m in model.modules()):
        raise SlimlmError("this model holds runtime kernels (slimlm.load(..., runtime=True)): save the model "
                          "loaded without runtime")
    if getattr(model.config, "slimlm_quant", None):
        raise SlimlmError("this model came from a quantized folder: its codes are written by `slimlm quantize`; "
                          "copy that folder instead")
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    if output.needs_slimlm(path):
        output.mark_slimlm_only(path)


def factorize(model: nn.Module, keep: float = 0.25, init: str = "svd", data=None, tokenizer=None,
              scores: dict | None = None, include: list[str] | None = None, ignore: list[str] | None = None,
              nsamples: int = 8, seqlen: int | None = None, seed: int = 0, iters: int = 20,
              pruned_weight: float = 0.1) -> dict[str, int]:
    """Replace the target layers of an in-memory model by low-rank factors (LowRankLinear, y = A(Bx) + b),
    in place, each at the rank that holds at most `keep` of its weights: r = floor(keep*out*in/(out+in)).
    Returns {layer name: rank}; `model.config.slimlm_lowrank` records them (`slimlm.save` then
    `slimlm.load` rebuild the layers). Targets: every Linear/Conv1D in the transformer blocks, or as
    `include`/`ignore` regexes say.

    init, and what each needs:
    - "svd": nothing; the truncated SVD (best rank-r approximation of each weight).
    - "fisher": `data` to compute the empirical Fisher (squared gradients of the model's own loss):
      calibration text as slimlm.oneshot takes it (a list of strings or a data spec, with `tokenizer`:
      `nsamples` windows of `seqlen` tokens drawn with `seed`; or a 2-D tensor of token windows), each
      window one batch of the causal LM loss; or, for any model, a list of batches (dicts) that the
      model's forward turns into a `.loss`, e.g. input_ids, attention_mask and labels of a classifier.
      Rows with larger Fisher information are fitted more closely (Hsu et al. 2022).
    - "sparsity-aware": a pruned model (e.g. after slimlm.oneshot): the mask is its non-zero weights and
      the kept entries are fitted weighted by importance `scores`: {layer: (out, in) tensor} if given,
      else |W| times the calibration inputs' column norms ||x_j|| (Wanda's score) when `data` is text or
      token windows, else |W|. The pruned entries are pulled toward zero with weight `pruned_weight`
      (0 leaves them free: the factors then drift further from the pruned layer than a zero output).
    - "activation": `data` as for "fisher"; fits each layer's *output* on the inputs it sees there
      (the truncated SVD of W L mapped back by L^-1, X X^T = L L^T): the closest rank-r layer in function.
    iters: iterations of the weighted fit (sparsity-aware).

    A missing requirement is a SlimlmError that says what to pass.
    """
    if init not in FACTORIZATIONS:
        raise SlimlmError(f"unknown init '{init}': choose one of {', '.join(FACTORIZATIONS)}")
    targets = models.find_targets(model, include, ignore)
    for name, module in targets.items():
        if isinstance(module, LowRankLinear):
            raise SlimlmError(f"layer '{name}' is already low-rank: factorize the model it came from, or "
                              "ignore= it")
    fisher, norms, grams = None, None, None
    if init in ("fisher", "activation"):
        if data is None:
            raise SlimlmError(f"init='{init}' needs data (the Fisher information, or the layers' inputs): pass data= "
                              "(texts with tokenizer=, token windows, or labeled batches), or use init='svd'")
        batches = _batches(model, data, tokenizer, nsamples, seqlen, seed)
        if init == "fisher":
            fisher = _fisher(model, targets, batches)
        else:
            from .methods.lpaf import input_grams
            grams = input_grams(model, targets, batches)
    if init == "sparsity-aware":
        dense = [n for n, m in targets.items() if bool((linear_view(m)[0] != 0).all())]
        if dense:
            raise SlimlmError(f"init='sparsity-aware' factors a pruned model, but layer '{dense[0]}' has no zero "
                              "weights: prune first (slimlm.oneshot), or use init='svd' or 'fisher'")
        if scores is None and data is not None:
            from .pruning import token_windows
            from .prune import calibration_input_norms

            windows, _ = token_windows(model, tokenizer, data, nsamples, seqlen, seed)
            norms = calibration_input_norms(model, targets, windows)
    ranks = {}
    with torch.no_grad():
        for name, module in targets.items():
            weight, bias = linear_view(module)
            rank = rank_for_budget(weight.shape[0], weight.shape[1], keep)
            mask, layer_scores = None, None
            if init == "sparsity-aware":
                mask = weight != 0
                layer_scores = _scores(name, weight, scores, norms)
            A, B = factor_matrix(init, weight, rank, mask=mask, scores=layer_scores,
                                 fisher=fisher[name] if fisher else None, iters=iters, pruned_weight=pruned_weight,
                                 gram=grams[name].to(weight.device) if grams else None)
            replace_module(model, name, LowRankLinear.from_factors(A, B, bias))
            ranks[name] = rank
    model.config.slimlm_lowrank = {**(getattr(model.config, "slimlm_lowrank", None) or {}), **ranks}
    return ranks


def _scores(name: str, weight: torch.Tensor, scores: dict | None, norms: dict | None) -> torch.Tensor:
    if scores is not None:
        if name not in scores:
            raise SlimlmError(f"scores= has no entry for layer '{name}': give an (out, in) tensor for every target")
        given = torch.as_tensor(scores[name]).to(weight.device)
        if tuple(given.shape) != tuple(weight.shape):
            raise SlimlmError(f"scores for '{name}' have shape {tuple(given.shape)}, the weight (out, in) "
                              f"{tuple(weight.shape)}")
        return given
    if norms is not None:
        return weight.abs().float() * norms[name].to(weight.device)[None, :]
    return weight.abs()


def _batches(model: nn.Module, data, tokenizer, nsamples: int, seqlen: int | None, seed: int) -> list[dict]:
    """Labeled batches as given, or one causal-LM batch (labels = input_ids) per calibration window."""
    if isinstance(data, (list, tuple)) and data and all(isinstance(b, dict) for b in data):
        return list(data)
    from .pruning import token_windows

    windows, _ = token_windows(model, tokenizer, data, nsamples, seqlen, seed)
    return [{"input_ids": w[None], "labels": w[None]} for w in windows]


def _fisher(model: nn.Module, targets: dict, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Squared gradients of the model's own loss with respect to the target weights (dropout off, only
    the target weights taking gradients); the model's training mode and requires_grad flags are restored."""
    from .methods.lpaf import fisher_information

    device = next(model.parameters()).device

    def loss_of(m, batch):
        out = m(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        if getattr(out, "loss", None) is None:
            raise SlimlmError(f"{type(m).__name__} computed no loss from the batch: init='fisher' needs labels "
                              "(a model with a head, and batches with labels)")
        return out.loss, {}

    flags = {p: p.requires_grad for p in model.parameters()}
    training = model.training
    try:
        for p in flags:
            p.requires_grad_(False)
        for module in targets.values():
            masked.dense_weight(module).requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            return fisher_information(model, targets, batches, loss_of)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(training)
