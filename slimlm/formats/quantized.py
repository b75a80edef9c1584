"""slimlm's quantized format: packed integer codes in `quant.safetensors` beside a stock checkpoint
(docs/formats.md). Writing (`pack`, `sizes`) and reading back (`read_codes`, `load_into`, which
`slimlm.load` calls); the quantize job and the compressed-tensors export build on it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SlimlmError
from ..ops import quant
from ..ops.masked import weight_matrix
from ..ops.sparsity import is_valid_nm
from . import weights

FILENAME = "quant.safetensors"


def pack(layers: dict, bits: int, group: int | None) -> tuple[dict, dict]:
    """Tensors for quant.safetensors and each layer's storage kind ('2:4' packed or 'dense')."""
    tensors, kinds = {}, {}
    for name, (codes, scales) in layers.items():
        if codes.shape[1] % 4 == 0 and is_valid_nm(codes, 2, 4):
            packed = quant.pack_24(codes, bits)
            tensors[f"{name}.values"], tensors[f"{name}.positions"] = packed["values"], packed["positions"]
            kinds[name] = "2:4"
        else:
            tensors[f"{name}.codes"] = quant.pack_dense(codes, bits)
            kinds[name] = "dense"
        tensors[f"{name}.scales"] = scales.half().contiguous()
    return {k: v.cpu() for k, v in tensors.items()}, kinds


def sizes(model, layers: dict, tensors: dict) -> dict:
    """Bytes of the target layers' weights: dense fp16, 2:4 fp16 (values + 2-bit positions), and as stored."""
    numel = sum(codes.numel() for codes, _ in layers.values())
    return {"target_weights": numel, "dense_fp16_bytes": 2 * numel, "sparse_24_fp16_bytes": numel + numel // 8,
            "stored_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "other_parameters": sum(p.numel() for p in model.parameters()) - numel}


def read_codes(folder: Path, spec: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{NAME: (int8 codes (out, in), float32 scales)} of the quantized layers, unpacked from quant.safetensors."""
    path = folder / FILENAME
    if not path.is_file():
        raise SlimlmError(f"{folder}: config.json lists quantized layers but {FILENAME} is missing")
    tensors = weights.read(path)
    layers = {}
    for name, kind in spec["layers"].items():
        if kind == "2:4":
            values = tensors[f"{name}.values"]  # 2 of every 4 columns; 4-bit: two per byte
            shape = (values.shape[0], values.shape[1] * (2 if values.dtype == torch.int8 else 4))
            codes = quant.unpack_24({"values": values, "positions": tensors[f"{name}.positions"]}, shape)
        else:
            codes = quant.unpack_dense(tensors[f"{name}.codes"])
        layers[name] = (codes, tensors[f"{name}.scales"].float())
    return layers


def group_size_of(group_size: int | None) -> int | None:
    """A --group-size (or config.slimlm_quant's) as quant.py takes it: None for one scale per output
    channel, which the options spell -1 (or 0, or nothing)."""
    return None if group_size in (None, -1, 0) else group_size


def describe_group(group_size: int | None) -> str:
    group = group_size_of(group_size)
    return "per channel" if group is None else f"group {group}"


def load_into(model, folder: Path, spec: dict) -> None:
    """Rebuild the float weights of the quantized layers (slimlm.load calls this)."""
    codes = read_codes(folder, spec)
    with torch.no_grad():
        for name, (layer_codes, scales) in codes.items():
            W = weight_matrix(weights.named_layer(model, name, folder / FILENAME))
            if tuple(W.shape) != tuple(layer_codes.shape):
                raise SlimlmError(f"{folder}: layer {name} is {tuple(W.shape)} but its codes are {tuple(layer_codes.shape)}")
            W.copy_(quant.dequantize(layer_codes, scales, group_size_of(spec["group_size"])).to(W.dtype))
