"""SLoRB (Sparse Low-Rank Boosting, AST paper): a small dense side path y += S (X x).

X in {0,1}^(in/k x in) sums each group of k consecutive inputs; S (out x in/k) starts from what the
initial mask removed, S_ij = (1/k) sum_{p in group j} W_ip (1 - M_ip). Why: if the inputs are equal
within each group, the sparse layer plus S X x reproduces the dense layer exactly. S (and optionally
X) train with the model; SLoRB cannot be folded into a 2:4 weight, so it is saved next to the
checkpoint (slorb.safetensors) and re-attached by `slimlm.load`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

FILENAME = "slorb.safetensors"


class SLoRB(nn.Module):
    def __init__(self, out_features: int, in_features: int, group_size: int, train_x: bool):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"input width {in_features} is not divisible by the SLoRB group size {group_size}")
        self.group_size = group_size
        self.S = nn.Parameter(torch.zeros(out_features, in_features // group_size))
        grouping = torch.repeat_interleave(torch.eye(in_features // group_size), group_size, dim=1)
        # X is a parameter only when it trains; a fixed X is the cheap reshape-and-sum below
        self.X = nn.Parameter(grouping) if train_x else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.X is not None:
            pooled = F.linear(x, self.X.to(x.dtype))
        else:
            pooled = x.reshape(*x.shape[:-1], -1, self.group_size).sum(-1)
        return F.linear(pooled, self.S.to(x.dtype))


def mean_init(weight_out_in: torch.Tensor, keep_mask_out_in: torch.Tensor, group_size: int) -> torch.Tensor:
    """S_ij = (1/k) * sum over group j of the weights the mask removed."""
    removed = weight_out_in * (~keep_mask_out_in)
    out, width = removed.shape
    return removed.reshape(out, width // group_size, group_size).sum(-1) / group_size


def _add_side_path(module, inputs, output):
    return output + module.slorb(inputs[0])


def attach(module: nn.Module, slorb: SLoRB) -> None:
    module.slorb = slorb
    module._slorb_hook = module.register_forward_hook(_add_side_path)


def attached(model: nn.Module) -> dict[str, SLoRB]:
    """The SLoRB side paths attached to the layers of `model`, by layer name."""
    return {name: m.slorb for name, m in model.named_modules() if isinstance(getattr(m, "slorb", None), SLoRB)}


def save(slorbs: dict[str, SLoRB], folder: Path) -> None:
    tensors, layout = {}, {}
    for name, s in slorbs.items():
        tensors[f"{name}.S"] = s.S.detach().contiguous()
        if s.X is not None:
            tensors[f"{name}.X"] = s.X.detach().contiguous()
        layout[name] = {"group_size": s.group_size, "train_x": s.X is not None}
    save_file(tensors, str(Path(folder) / FILENAME), metadata={"layout": json.dumps(layout)})


def load_into(model: nn.Module, folder: Path) -> int:
    """Attach the SLoRB paths saved in `folder` (if any) to `model`; returns how many."""
    path = Path(folder) / FILENAME
    if not path.is_file():
        return 0
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        layout = json.loads(f.metadata()["layout"])
    tensors = load_file(str(path))
    modules = dict(model.named_modules())
    for name, info in layout.items():
        S = tensors[f"{name}.S"]
        slorb = SLoRB(S.shape[0], S.shape[1] * info["group_size"], info["group_size"], info["train_x"])
        slorb.S.data.copy_(S)
        if info["train_x"]:
            slorb.X.data.copy_(tensors[f"{name}.X"])
        attach(modules[name], slorb.to(next(model.parameters()).device))
    return len(layout)
