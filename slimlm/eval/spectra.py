"""Singular-value spectra of target layers, grouped by layer type, as a PNG: the picture behind LPAF
(movement-pruned matrices concentrate their energy in few directions, magnitude-pruned ones do not)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models import weight_matrix


@torch.no_grad()
def energy_curves(targets: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Per layer type (the name inside the block: self_attn.q_proj, attention.self.query, ...): the mean over layers of the
    cumulative spectral energy sum_{i<=k} s_i^2 / sum s^2, at k = 1 .. min(out, in), resampled to 200 points
    of k / min(out, in) so that layers of different shapes average."""
    grouped: dict[str, list[torch.Tensor]] = {}
    grid = torch.linspace(0, 1, 200)
    for name, module in targets.items():
        s = torch.linalg.svdvals(weight_matrix(module).detach().double())
        energy = (s**2).cumsum(0) / (s**2).sum().clamp_min(1e-300)
        x = torch.arange(1, len(s) + 1, dtype=torch.float64) / len(s)
        curve = torch.from_numpy(np.interp(grid.numpy(), x.numpy(), energy.numpy()))
        grouped.setdefault(_layer_type(name), []).append(curve)
    return {k: torch.stack(v).mean(0) for k, v in grouped.items()}


def _layer_type(name: str) -> str:
    """The name inside its block: model.layers.3.self_attn.q_proj -> self_attn.q_proj,
    bert.encoder.layer.0.attention.output.dense -> attention.output.dense."""
    inside = re.split(r"\.\d+\.", name, maxsplit=1)
    return inside[-1]


def plot_spectra(curves: dict[str, dict[str, torch.Tensor]], path: str | Path, title: str = "") -> None:
    """`curves`: {model label: energy_curves(...)}; one panel per layer type, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = list(next(iter(curves.values())))
    cols = min(4, len(types))
    rows = (len(types) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows), squeeze=False)
    grid = torch.linspace(0, 1, 200)
    for ax, layer_type in zip(axes.flat, types):
        for label, by_type in curves.items():
            if layer_type in by_type:
                ax.plot(grid, by_type[layer_type], label=label)
        ax.axhline(0.9, color="grey", lw=0.6, ls=":")
        ax.set(title=layer_type, xlabel="rank / full rank", ylabel="spectral energy", ylim=(0, 1.01))
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title or "cumulative singular-value energy per layer type (dotted: 90%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
