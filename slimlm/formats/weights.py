"""Weight files slimlm reads from local folders: safetensors only, checked before they are used.

A pickle (`pytorch_model.bin`, `.pt`, `.ckpt`) can run code while it is unpickled, so a local folder whose
weights are only pickled is refused before anything opens it. A safetensors file is an 8-byte header
length, a JSON header of tensor offsets, then the data: a truncated or foreign file shows in the header
alone, so it is checked there (cheaply, without reading the data) and named in the error."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from torch import nn

from ..errors import SlimlmError, reading

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
AGAIN = "copy or download it again"


def refuse_pickles(folder: Path) -> None:
    """A model folder without safetensors weights but with pickled ones: refused, nothing unpickled."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and "training_args" not in p.name)
    if pickles:
        raise SlimlmError(
            f"{folder / pickles[0]} is a pickle, which can run code when loaded: slimlm loads safetensors weights "
            "only; if you trust the file, convert it once with transformers (from_pretrained(folder)"
            ".save_pretrained(new_folder, safe_serialization=True)) and give slimlm the new folder")


def check(path: Path) -> dict:
    """The header of a safetensors file, after checking that the data it describes is all there."""
    path = Path(path)
    with reading(path, "weights file", AGAIN):
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a table of tensors")
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        if max(ends, default=0) > size - 8 - n:
            raise ValueError(f"truncated: {size} bytes, its header describes {8 + n + max(ends)}")
    return header


def check_folder(folder: Path) -> None:
    """Every safetensors file of a local model folder (model shards, quantized codes, SLoRB paths)."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        check(path)


def read(path: Path) -> dict:
    """All tensors of a checked safetensors file; a failure names the file."""
    from safetensors.torch import load_file

    check(path)
    with reading(path, "weights file", AGAIN):
        return load_file(str(path))


def named_layer(model: nn.Module, name: str, source) -> nn.Module:
    """The layer `name` that a folder's file (`source`) refers to, or an error naming both."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise SlimlmError(f"{source} names layer {name}, which the model does not have: the folder is damaged or "
                          "mixes files of different models; copy or download it again") from None
