"""Which device a command runs on. `auto` (every command's default) is the GPU when PyTorch sees one,
else the CPU, as transformers' Trainer and accelerate choose."""
from __future__ import annotations

import os

import torch

from .errors import SlimlmError


def resolve(name: str, announce: bool = False) -> str:
    """A device name torch accepts, checked: 'auto' picks cuda or cpu (and says which on stdout when
    `announce`, once per torchrun job; stderr is kept for errors); an unknown name or a GPU that is not
    there is an error."""
    if name == "auto":
        chosen = "cuda" if torch.cuda.is_available() else "cpu"
        if announce and os.environ.get("RANK", "0") == "0":
            why = torch.cuda.get_device_name(0) if chosen == "cuda" else "no CUDA GPU visible"
            print(f"device: {chosen} (auto: {why})")
        return chosen
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SlimlmError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SlimlmError(f"device '{name}': no CUDA GPU is visible to PyTorch; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SlimlmError(f"device '{name}': PyTorch sees {torch.cuda.device_count()} GPU(s)")
    return name
