"""Training curves as a PNG (loss, CE/KL, validation perplexity, mask flip rate)."""
from __future__ import annotations

from pathlib import Path


def plot_curves(records: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("training loss", ["loss", "ce", "kl"]), ("validation perplexity", ["val_ppl"]),
              ("mask flip rate", ["mask_flip_rate"]), ("learning rate", ["lr"]), ("SR-STE decay λ", ["lambda"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2))
    for ax, (name, keys) in zip(axes, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="o" if len(pts) < 20 else None, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
