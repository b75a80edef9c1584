"""One-shot pruning: magnitude, Wanda and SparseGPT, all in place on the model's target layers."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SlimlmError
from ..models import weight_matrix
from ..ops.sparsity import Sparsity
from .blockwise import InputStats, prune_blockwise
from .reconstruct import Reconstruction, reconstruct
from .scores import magnitude_mask, wanda_mask
from .sparsegpt import sparsegpt_prune

METHODS = ("magnitude", "wanda", "sparsegpt")


def prune(model: nn.Module, targets: dict[str, nn.Module], method: str, sparsity: Sparsity,
          windows: torch.Tensor | None = None, blocksize: int = 128, percdamp: float = 0.01,
          input_norms: dict | None = None, reconstruction: Reconstruction | None = None,
          **reconstruct_args) -> list[dict] | None:
    """Prune the target layers of `model` in place. Wanda and SparseGPT need calibration windows.
    `input_norms`: filled with each layer's ||x_j|| over the calibration tokens (calibrated methods).
    `reconstruction`: then train each block to reproduce the dense outputs (prune/reconstruct.py;
    `reconstruct_args`: its seed, checkpoint_dir and identity); returns its per-block records."""
    if method not in METHODS:
        raise SlimlmError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    if reconstruction is not None:
        if windows is None:
            raise SlimlmError("reconstruction trains on calibration data: pass --calib")
        prune_layer = _magnitude_layer(sparsity) if method == "magnitude" else _calibrated_layer(
            method, sparsity, blocksize, percdamp, input_norms)
        return reconstruct(model, targets, prune_layer, method == "sparsegpt", windows, sparsity, reconstruction, **reconstruct_args)
    with torch.no_grad():
        _prune(model, targets, method, sparsity, windows, blocksize, percdamp, input_norms)
    return None


def _magnitude_layer(sparsity: Sparsity):
    def prune_magnitude(name: str, module: nn.Module, stats: InputStats) -> None:
        W = weight_matrix(module)
        W.mul_(magnitude_mask(W, sparsity))
    return prune_magnitude


def _calibrated_layer(method: str, sparsity: Sparsity, blocksize: int, percdamp: float, input_norms: dict | None):
    """prune_layer(name, module, stats) of Wanda or SparseGPT, from the layer's input statistics."""
    def prune_wanda(name: str, module: nn.Module, stats: InputStats) -> None:
        _keep_norms(input_norms, name, stats)
        W = weight_matrix(module)
        W.mul_(wanda_mask(W, stats.sq_norms, sparsity))

    def prune_sparsegpt(name: str, module: nn.Module, stats: InputStats) -> None:
        _keep_norms(input_norms, name, stats)
        W = weight_matrix(module)
        try:
            W.copy_(sparsegpt_prune(W, stats.hessian, sparsity, blocksize, percdamp))
        except torch.linalg.LinAlgError:
            raise SlimlmError(f"SparseGPT: the Hessian of '{name}' is not positive definite even after "
                              f"dampening by {percdamp}: raise --percdamp or use more calibration data") from None

    return prune_wanda if method == "wanda" else prune_sparsegpt


def _prune(model, targets, method, sparsity, windows, blocksize, percdamp, input_norms) -> None:
    if method == "magnitude":
        prune_layer = _magnitude_layer(sparsity)
        for name, module in tqdm(targets.items(), desc="magnitude pruning", unit="layer"):
            prune_layer(name, module, None)
        return
    if windows is None:
        raise SlimlmError(f"--method {method} needs calibration data (--calib)")
    prune_blockwise(model, targets, windows, _calibrated_layer(method, sparsity, blocksize, percdamp, input_norms),
                    hessian=method == "sparsegpt")


def _keep_norms(input_norms: dict | None, name: str, stats: InputStats) -> None:
    if input_norms is not None:
        input_norms[name] = stats.sq_norms.sqrt()


@torch.no_grad()
def calibration_input_norms(model: nn.Module, targets: dict[str, nn.Module], windows: torch.Tensor) -> dict:
    """||x_j|| of every target layer's inputs over the calibration windows, the model unchanged."""
    norms: dict = {}
    prune_blockwise(model, targets, windows, lambda name, module, stats: _keep_norms(norms, name, stats), hessian=False,
                    desc="calibrating blocks")
    return norms
