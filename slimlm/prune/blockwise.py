"""Run calibration windows through a model one transformer block at a time.

As in the SparseGPT and Wanda reference implementations: capture the inputs of the first block,
then for each block (1) collect statistics of every target layer's inputs in one pass, (2) prune
those layers, (3) run the block again so that the *pruned* block's outputs feed the next block.
Only one block's activations are alive at a time, so memory stays bounded by one block.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SlimlmError
from ..models import find_blocks, weight_matrix


class _InputsCaptured(Exception):
    """Raised by the hook on the first block to stop the forward pass once its inputs are known."""


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


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, windows: torch.Tensor) -> list[tuple]:
    """For each window, the (hidden_states, other positional args, kwargs) the first block receives."""
    captured = []
    device = next(model.parameters()).device

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, tuple(args[1:]), kwargs))
        raise _InputsCaptured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        for window in windows:
            try:
                model(input_ids=window.unsqueeze(0).to(device))
            except _InputsCaptured:
                pass
    finally:
        handle.remove()
        if use_cache is not None:
            model.config.use_cache = use_cache
    return captured


def _run_block(block, hidden, args, kwargs):
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
    inputs = capture_block_inputs(model, blocks[0], windows)
    hidden = [h for h, _, _ in inputs]
    bar = tqdm(list(enumerate(blocks)), desc=desc, unit="block")
    for index, block in bar:
        layer_prefix = f"{prefix}.{index}."
        layers = {n: m for n, m in targets.items() if n.startswith(layer_prefix)}
        if not layers:
            hidden = [_run_block(block, h, a, k) for h, (_, a, k) in zip(hidden, inputs)]
            continue
        device = next(block.parameters()).device
        stats = {n: InputStats(weight_matrix(m).shape[1], hessian, device) for n, m in layers.items()}
        handles = [m.register_forward_hook(lambda mod, args, out, s=stats[n]: s.add(args[0]))
                   for n, m in layers.items()]
        try:
            for h, (_, a, k) in zip(hidden, inputs):
                _run_block(block, h, a, k)
        finally:
            for handle in handles:
                handle.remove()
        for name, module in layers.items():
            prune_layer(name, module, stats.pop(name))
        hidden = [_run_block(block, h, a, k) for h, (_, a, k) in zip(hidden, inputs)]


def run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """One block's output hidden states for one window's captured inputs."""
    return _run_block(block, hidden, args, kwargs)


@torch.no_grad()
def collect_stats(block: nn.Module, layers: dict[str, nn.Module], inputs: list[tuple], hessian: bool) -> dict:
    """{layer name: InputStats} of the block's target layers over the windows' (hidden, args, kwargs)."""
    device = next(block.parameters()).device
    stats = {n: InputStats(weight_matrix(m).shape[1], hessian, device) for n, m in layers.items()}
    handles = [m.register_forward_hook(lambda mod, args, out, s=stats[n]: s.add(args[0])) for n, m in layers.items()]
    try:
        for h, a, k in inputs:
            _run_block(block, h, a, k)
    finally:
        for handle in handles:
            handle.remove()
    return stats
