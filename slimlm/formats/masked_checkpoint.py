"""Checkpoints written while masks were attached (a `transformers.Trainer` running AST through `slimlm.hf`):
their masked layers are stored as the dense weight plus the mask; `slimlm.load` bakes them (m ⊙ W)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

ORIGINAL, MASK = ".parametrizations.weight.original", ".parametrizations.weight.0.mask"


def baked_checkpoint_weights(folder) -> dict[str, torch.Tensor]:
    """A checkpoint written while masks were attached (e.g. by a transformers.Trainer during sparse
    training) stores each masked layer as NAME.parametrizations.weight.original (the dense weight) and
    NAME.parametrizations.weight.0.mask: {NAME.weight: mask * original} for those layers, {} for a plain
    checkpoint. Reads the model*.safetensors files of `folder`."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("model*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key.endswith((ORIGINAL, MASK)):
                    tensors[key] = f.get_tensor(key)
    baked = {}
    for key, original in tensors.items():
        if key.endswith(ORIGINAL):
            name = key[: -len(ORIGINAL)]
            mask = tensors.get(name + MASK)
            baked[name + ".weight"] = original * mask.to(original.dtype) if mask is not None else original
    return baked
