"""Training curves of one run as a PNG: losses, validation score, mask flip rate, learning rate, decay."""
from __future__ import annotations

from pathlib import Path

from ..report.plotting import log_if_spread, pyplot, save

# (panel title, [(key in metrics.jsonl, line label)]). A distilling run's `loss` is α·KL + (1-α)·CE,
# drawn beside its two parts; without a teacher `loss` is the CE itself and is not drawn twice.
PANELS = [("training loss (nats)", [("ce", "cross-entropy"), ("kl", "KL to the teacher"),
                                    ("loss", "objective α·KL + (1-α)·CE")]),
          ("validation perplexity (lower is better)", [("val_ppl", "perplexity")]),
          ("validation accuracy (higher is better)", [("val_acc", "accuracy")]),
          ("mask flip rate", [("mask_flip_rate", "flipped share of weights")]),
          ("learning rate", [("lr", "lr")]),
          ("SR-STE decay λ", [("lambda", "λ")])]


def panel_lines(records: list[dict]) -> list[tuple[str, list[tuple[str, list]]]]:
    """The panels that have data, each with its (label, [(step, value)]) lines: a classifier has no
    perplexity, a run without masks no flip rate, and neither gets an empty panel."""
    distilled = any("kl" in r for r in records)
    panels = []
    for title, keys in PANELS:
        lines = [(label, [(r["step"], r[key]) for r in records if key in r]) for key, label in keys
                 if key != "loss" or distilled or not any("ce" in r for r in records)]
        lines = [(label, pts) for label, pts in lines if pts]
        if lines:
            panels.append((title, lines))
    return panels


def plot_curves(records: list[dict], path: Path, title: str = "") -> None:
    panels = panel_lines(records)
    if not panels:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.4), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels):
        for label, pts in lines:
            ax.plot(*zip(*pts), label=label, marker="o" if len(pts) < 20 else None, markersize=3)
        if name.startswith("validation perplexity"):
            log_if_spread(ax, [v for _, pts in lines for _, v in pts])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save(fig, path, dpi=110)
