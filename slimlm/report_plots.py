"""The PNGs of `slimlm report`: quality against non-zero parameters, and training curves.
A run keeps its colour and marker in every panel of both pictures."""
from __future__ import annotations

from pathlib import Path

from .tasks import scores

MARKERS = "osD^vP*Xph<>"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(i: int) -> dict:
    import matplotlib

    return {"color": matplotlib.colormaps["tab20"](i % 20), "marker": MARKERS[i % len(MARKERS)]}


def quality_panels(rows: list[dict], names: list[str]) -> list[tuple[str, list[tuple[int, float, float]]]]:
    """[(panel title, [(run index, non-zero params, value)])]: one panel per measure, and per data set
    for the runs' own evaluations (perplexities on different data are not comparable)."""
    panels: dict[str, list] = {}
    for i, r in enumerate(rows):
        if r["kept"] is None:
            continue
        if r["value"] is not None:
            panels.setdefault(f"{r['metric']} on {r['evaluated_on']}", []).append((i, r["kept"], r["value"]))
        for task, t in r["tasks"].items():
            first = scores(t)[:1]  # a task's first metric is its headline one (acc before acc_norm)
            for metric, value, _ in first:
                panels.setdefault(f"{task} ({metric}, lm-eval)", []).append((i, r["kept"], value))
    return list(panels.items())


def plot_quality(rows: list[dict], names: list[str], path: Path) -> bool:
    """Draw every run that knows its parameter count and a score; False if there is nothing to draw."""
    panels = quality_panels(rows, names)
    if not panels:
        return False
    plt = _pyplot()
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols + 2.5, 3.8 * nrows), squeeze=False)
    shown = set()
    for ax, (title, points) in zip(axes.flat, panels):
        for i, kept, value in points:
            ax.scatter([kept / 1e6], [value], s=40, label=names[i], **_style(i))
            shown.add(i)
        values = [v for _, _, v in points]
        if title.startswith("perplexity") and max(values) > 4 * min(values):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("non-zero parameters (millions)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], linestyle="", markersize=6, **_style(i)) for i in sorted(shown)]
    fig.legend(handles, [names[i] for i in sorted(shown)], loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / (5 * cols + 2.5), 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean: per-step losses are noisy, the trend is what the picture is for."""
    out, total = [], 0.0
    for k, v in enumerate(values):
        total += v - (values[k - window] if k >= window else 0.0)
        out.append(total / min(k + 1, window))
    return out


def token_axis(history: list[dict]) -> list[float]:
    """Training tokens at each record, counted over the whole run. Runs published before slimlm counted
    LPAF's tokens over the whole run restarted the count at its second stage: a drop starts a new stage
    on top of the previous one. Records without tokens use the step."""
    xs, offset, last = [], 0, 0
    for h in history:
        t = h.get("tokens", h["step"])
        if t < last:
            offset += last
        last = t
        xs.append(offset + t)
    return xs


def plot_curves(rows: list[dict], names: list[str], path: Path) -> bool:
    """Training loss (smoothed) and validation score against training tokens, one line per trained
    run; language models and classifiers on separate rows (their losses are on different scales)."""
    kinds = sorted({r["model_kind"] or "?" for r in rows if r["history"]})
    if not kinds:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(kinds), 2, figsize=(13, 4 * len(kinds)), squeeze=False)
    for (loss_ax, val_ax), kind in zip(axes, kinds):
        for i, r in enumerate(rows):
            if not r["history"] or (r["model_kind"] or "?") != kind:
                continue
            style = _style(i)
            records = list(zip(token_axis(r["history"]), r["history"]))
            steps = [(x, h["loss"]) for x, h in records if "loss" in h]
            losses = _smooth([loss for _, loss in steps], max(1, len(steps) // 25))
            loss_ax.plot([x for x, _ in steps], losses, color=style["color"], linewidth=1.2, label=names[i])
            for metric in ("val_ppl", "val_acc"):
                pts = [(x, h[metric]) for x, h in records if metric in h]
                if pts:
                    val_ax.plot(*zip(*pts), markersize=4, linewidth=1, label=names[i], **style)
                    val_ax.set_title(f"{kind}: validation {'perplexity' if metric == 'val_ppl' else 'accuracy'}",
                                     fontsize=10)
                    if metric == "val_ppl":
                        val_ax.set_yscale("log")
        loss_ax.set_title(f"{kind}: training loss (trailing mean)", fontsize=10)
        loss_ax.set_yscale("log")
        for ax in (loss_ax, val_ax):
            ax.set_xlabel("training tokens")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
            else:
                ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
