"""Run calibration windows through a model one transformer block at a time.

As in the SparseGPT and Wanda reference implementations: capture the inputs of the first block,
then for each block (1) collect statistics of every target layer's inputs in one pass, (2) prune
those layers, (3) run the block again so that the *pruned* block's outputs feed the next block.
Only one block's activations are alive at a time, so memory stays bounded by one block.

Unlike the references, every block gets the other arguments that *it* receives in the model's own
forward (attention mask, rotary embeddings, cache position...), not the first block's: in Gemma-2/3,
Qwen2 with max_window_layers, or any model whose layers differ, a global-attention layer needs the
full causal mask and its own RoPE, a sliding-window layer the windowed mask. They are recorded in one
cheap pass per window (see `capture_block_inputs`); they must not depend on the hidden states, which
holds for every decoder and encoder stack whose loop only passes the hidden states from block to block.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SlimlmError
from ..models import find_blocks, weight_matrix


class InputStats:
    """Running statistics of one layer's inputs over the calibration tokens."""

    def __init__(self, width: int, hessian: bool, device):
        self.sq_norms = torch.zeros(width, dtype=torch.float32, device=device)  # sum_t x_tj^2 (Wanda)
        self.xtx = torch.zeros(width, width, dtype=torch.float32, device=device) if hessian else None
        self.windows = 0

    def add(self, x: torch.Tensor) -> None:
        self.windows += x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self.sq_norms += (x * x).sum(0)
        if self.xtx is not None:
            self.xtx += x.T @ x

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2/n * sum x x^T, n = number of calibration windows (the reference's scaling)."""
        return self.xtx * (2.0 / max(self.windows, 1))



class _Captured(Exception):
    """Raised by the last block's stand-in: every block's arguments are known, the rest of the forward
    (final norm, LM head: a large logits tensor) is not needed."""


class _Interner:
    """Keeps one stored copy of each distinct tensor among the recorded arguments: the layers of one type
    share their mask and rotary embeddings, and windows of one length get equal ones, so what is kept is a
    few tensors per layer type, not one per block and window. Equal means same shape, dtype, device,
    strides and values (the block then computes exactly the same thing)."""

    RECENT = 8  # distinct values compared against per (shape, dtype, device, strides)

    def __init__(self):
        self.kept: dict[tuple, list[torch.Tensor]] = {}

    def __call__(self, value):
        if isinstance(value, torch.Tensor):
            seen = self.kept.setdefault((value.shape, value.dtype, value.device, value.stride()), [])
            for kept in reversed(seen[-self.RECENT:]):
                if kept is value or torch.equal(kept, value):
                    return kept
            seen.append(value)
            return value
        if type(value) in (tuple, list):
            return type(value)(self(v) for v in value)
        if type(value) is dict:
            return {k: self(v) for k, v in value.items()}
        return value


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList,
                         windows: torch.Tensor) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """Run the model's own forward on every window, with each block's forward replaced by a stand-in
    that records what the block receives. Returns (the hidden states entering the first block, one per
    window; for every block, one (other positional args, keyword args) pair per window).

    For the first window the blocks really run (to learn what each returns); for the others each stand-in
    passes its hidden states on unchanged in the same form, so the capture costs about one dense forward in
    all, and the last block's stand-in stops the forward before the LM head."""
    device = next(model.parameters()).device
    last = len(blocks) - 1
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
    returns: dict[int, object] = {}  # block index -> "tensor", ("tuple", type, tail) or "real"
    intern = _Interner()

    def stand_in(index: int, real_forward):
        def forward(*args, **kwargs):
            kwargs = dict(kwargs)
            states = args[0] if args else kwargs.pop("hidden_states")
            rest = tuple(args[1:])
            calls[index].append((intern(rest), intern(kwargs)))
            if index == 0:
                hidden.append(states)
            if index == last:
                raise _Captured
            kind = returns.get(index)
            if kind is None or kind == "real":
                out = real_forward(states, *rest, **kwargs)
                if kind is None:
                    returns[index] = ("tensor" if isinstance(out, torch.Tensor) else
                                      ("tuple", type(out), tuple(out[1:])) if type(out) in (tuple, list) else "real")
                return out
            if kind == "tensor":
                return states
            return kind[1]((states, *kind[2]))
        return forward

    saved = [block.__dict__.get("forward") for block in blocks]  # accelerate's offload hooks patch forward
    for index, block in enumerate(blocks):
        block.forward = stand_in(index, block.forward)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        for window in windows:
            try:
                model(input_ids=window.unsqueeze(0).to(device))
            except _Captured:
                pass
            missing = [i for i, c in enumerate(calls) if len(c) != len(hidden)]
            if missing:
                raise SlimlmError(f"block {missing[0]} of {type(model).__name__} did not run exactly once in the "
                                  "model's forward: block-by-block calibration cannot follow this model")
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
        if use_cache is not None:
            model.config.use_cache = use_cache
    return hidden, calls


def run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a block outputs for `hidden` and its recorded arguments."""
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def prune_blockwise(model: nn.Module, targets: dict[str, nn.Module], windows: torch.Tensor,
                    prune_layer: Callable[[str, nn.Module, InputStats], None], hessian: bool,
                    desc: str = "pruning blocks") -> None:
    """Calibrate and prune every target layer, block by block. `prune_layer(name, module, stats)`
    edits the module's weight in place (or quantizes it, or only reads the statistics); `desc` labels
    the progress bar with what it does."""
    prefix, blocks = find_blocks(model)
    outside = [n for n in targets if not n.startswith(prefix + ".")]
    if outside:
        raise SlimlmError(f"layer '{outside[0]}' is outside the transformer blocks ({prefix}); calibrated "
                          "methods prune block by block: use --method magnitude for it, or --ignore it")
    hidden, calls = capture_block_inputs(model, blocks, windows)
    bar = tqdm(list(enumerate(blocks)), desc=desc, unit="block")
    for index, block in bar:
        runs, calls[index] = calls[index], None  # this block's arguments are not needed after it
        layer_prefix = f"{prefix}.{index}."
        layers = {n: m for n, m in targets.items() if n.startswith(layer_prefix)}
        if layers:
            stats = collect_stats(block, layers, [(h, a, k) for h, (a, k) in zip(hidden, runs)], hessian)
            for name, module in layers.items():
                prune_layer(name, module, stats.pop(name))
        hidden = [run_block(block, h, a, k) for h, (a, k) in zip(hidden, runs)]


@torch.no_grad()
def collect_stats(block: nn.Module, layers: dict[str, nn.Module], inputs: list[tuple], hessian: bool) -> dict:
    """{layer name: InputStats} of the block's target layers over the windows' (hidden, args, kwargs)."""
    device = next(block.parameters()).device
    stats = {n: InputStats(weight_matrix(m).shape[1], hessian, device) for n, m in layers.items()}
    handles = [m.register_forward_hook(lambda mod, args, out, s=stats[n]: s.add(args[0])) for n, m in layers.items()]
    try:
        for h, a, k in inputs:
            run_block(block, h, a, k)
    finally:
        for handle in handles:
            handle.remove()
    return stats
