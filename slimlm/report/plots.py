"""The PNGs of `slimlm report`: each run's quality against the dense model, and training curves.
A run keeps its colour and marker in every panel of both pictures."""
from __future__ import annotations

from pathlib import Path

from .plotting import log_if_spread, plain, pyplot, save, style
from ..eval.tasks import scores

LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "loss")


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


def quality_panels(rows: list[dict], names: list[str]) -> list[dict]:
    """One panel per measure, and per data set for the runs' own evaluations (perplexities on different
    data are not comparable): {title, metric, points: [(run index, value, stderr)], dense: {label: value}}.
    Dense runs and the dense model a pruning run evaluated are the reference line, not points."""
    panels: dict[str, dict] = {}

    def panel(title: str, metric: str) -> dict:
        return panels.setdefault(title, {"title": title, "metric": metric, "points": [], "dense": {}})

    for i, r in enumerate(rows):
        measured = []
        if r["value"] is not None:
            measured.append((f"{r['metric']} on {r['evaluated_on']}", r["metric"], r["value"], None))
        for task, t in r["tasks"].items():
            for metric, value, err in scores(t)[:1]:  # a task's first metric is its headline one (acc before acc_norm)
                measured.append((f"{task} ({metric}, lm-eval)", metric, value, err))
        for title, metric, value, err in measured:
            if r["budget"] == "dense":
                panel(title, metric)["dense"][f"{names[i]} (dense)"] = value
            else:
                panel(title, metric)["points"].append((i, value, err))
        if r.get("dense_value") is not None:
            name = r.get("dense_name", r["base_model"])  # the model `slimlm report --dense` measured, or the pruned one's base
            panel(f"{r['metric']} on {r['evaluated_on']}", r["metric"])["dense"][f"dense {name}"] = r["dense_value"]
    return list(panels.values())


def _tick_label(row: dict, name: str) -> str:
    """The run's name, and its non-zero parameters where known: the size the quality was bought with."""
    if row["kept"] is None:
        return name
    share = f" ({row['kept'] / row['dense']:.0%})" if row["dense"] else ""
    return f"{name}\n{row['kept'] / 1e6:.1f}M params{share}"


def draw_quality(ax, panel: dict, rows: list[dict], names: list[str]) -> None:
    """One dot per run at its own x position (runs of the same size no longer hide each other), its
    value written beside it, the dense references as dashed lines."""
    for x, (i, value, err) in enumerate(panel["points"]):
        s = style(i)
        ax.errorbar([x], [value], yerr=None if err is None else [err], color=s["color"], marker=s["marker"],
                    markersize=7, capsize=3, linestyle="")
        ax.annotate(plain(value), (x, value), xytext=(7, 0), textcoords="offset points", va="center", fontsize=7)
    for k, (label, value) in enumerate(panel["dense"].items()):
        ax.axhline(value, color="black", linewidth=1, linestyle=["--", ":", "-."][k % 3], label=f"{label}: {plain(value)}")
    ax.set_xticks(range(len(panel["points"])))
    ax.set_xticklabels([_tick_label(rows[i], names[i]) for i, _, _ in panel["points"]], rotation=25, ha="right",
                       fontsize=7)
    ax.set_xlim(-0.6, len(panel["points"]) - 0.4)
    values = [v for _, v, _ in panel["points"]] + list(panel["dense"].values())
    if lower_is_better(panel["metric"]):
        log_if_spread(ax, values)
    ax.set_ylabel(f"{panel['metric']} ({'lower' if lower_is_better(panel['metric']) else 'higher'} is better)")
    ax.set_title(panel["title"], fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if panel["dense"]:
        ax.legend(fontsize=7, loc="best")


def quality_figure(rows: list[dict], names: list[str]):
    """One panel per row of the figure, as wide as its runs need; None if no run has a score."""
    panels = quality_panels(rows, names)
    if not panels:
        return None
    plt = pyplot()
    width = max(6.0, 0.75 * max(len(p["points"]) for p in panels) + 2.5)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 4.2 * len(panels)), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        draw_quality(ax, panel, rows, names)
    fig.tight_layout()
    return fig


def _save_figure(fig, path: Path) -> bool:
    """Save `fig` to `path`; False (nothing written) when there was nothing to draw."""
    if fig is None:
        return False
    save(fig, path)
    return True


def plot_quality(rows: list[dict], names: list[str], path: Path) -> bool:
    """Draw every run that has a score; False if there is nothing to draw."""
    return _save_figure(quality_figure(rows, names), path)


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


# (key in metrics.jsonl, panel title, y label, smoothed). Every method logs the task cross-entropy as `ce`;
# `loss` is what it minimised, for distilling runs α·KL + (1-α)·CE, so losses of runs with and
# without a teacher are not comparable: CE is the common measure, KL has its own panel, and `loss`
# is drawn only for runs that log no `ce` (older versions), on a panel of its own.
CURVES = [("ce", "training cross-entropy (trailing mean)", "nats", True),
          ("kl", "distillation KL to the teacher (trailing mean)", "nats", True),
          ("loss", "training objective as logged, runs without CE records (trailing mean)", "nats", True),
          ("val_ppl", "validation perplexity", "perplexity (lower is better)", False),
          ("val_acc", "validation accuracy", "accuracy (higher is better)", False)]


def curve(history: list[dict], key: str, smoothed: bool) -> list[tuple[float, float]]:
    """(training tokens, value) of one run's records of `key`; [] if it has none."""
    if key == "loss" and any("ce" in h for h in history):
        return []
    points = [(x, h[key]) for x, h in zip(token_axis(history), history) if key in h]
    if smoothed and points:
        values = _smooth([v for _, v in points], max(1, len(points) // 25))
        points = [(x, v) for (x, _), v in zip(points, values)]
    return points


def curve_panels(rows: list[dict]) -> list[tuple[str, str, str, bool, list[tuple[int, list]]]]:
    """(title, key, y label, smoothed, [(run index, points)]) per model kind and logged measure, only for those
    some run has data for: no empty panels (a classifier logs no perplexity, a run without teacher no KL)."""
    kinds = sorted({r["model_kind"] or "?" for r in rows if r["history"]})
    panels = []
    for kind in kinds:
        for key, title, ylabel, smoothed in CURVES:
            lines = [(i, curve(r["history"], key, smoothed)) for i, r in enumerate(rows)
                     if r["history"] and (r["model_kind"] or "?") == kind]
            lines = [(i, points) for i, points in lines if points]
            if lines:
                panels.append((f"{kind}: {title}", key, ylabel, smoothed, lines))
    return panels


def _tokens(v: float, _=None) -> str:
    return f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k" if v >= 1e3 else f"{v:g}"


def curves_figure(rows: list[dict], names: list[str]):
    """Up to three panels a row, one figure legend for all runs; None if no run has a history."""
    panels = curve_panels(rows)
    if not panels:
        return None
    import matplotlib.ticker

    plt = pyplot()
    cols = 2 if len(panels) in (2, 4) else min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols + 2.5, 3.8 * nrows), squeeze=False)
    shown = set()
    for ax, (title, key, ylabel, smoothed, lines) in zip(axes.flat, panels):
        for i, points in lines:
            s = style(i)
            ax.plot(*zip(*points), color=s["color"], linestyle=s["linestyle"], linewidth=1.3,
                    marker=None if smoothed else s["marker"], markersize=4)
            shown.add(i)
        if key != "val_acc":  # losses and perplexities: a diverged run must not flatten the others
            log_if_spread(ax, [v for _, points in lines for _, v in points])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_tokens))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    order = sorted(shown)
    handles = [plt.Line2D([], [], markersize=5, **style(i)) for i in order]
    fig.legend(handles, [names[i] for i in order], loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / (5 * cols + 2.5), 1))
    return fig


def plot_curves(rows: list[dict], names: list[str], path: Path) -> bool:
    """Training curves against training tokens for the runs that trained; False if none did."""
    return _save_figure(curves_figure(rows, names), path)
