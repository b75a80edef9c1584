"""What every slimlm PNG shares: the Agg backend, run colours that stay apart, and log axes labelled
with plain numbers (30, 50, 100 rather than 10^x)."""
from __future__ import annotations

import math

MARKERS = "osD^vP*Xph<>"
DASHES = ["-", "--", ":", "-."]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def style(i: int) -> dict:
    """Colour, marker and line style of the i-th run. tab10 has no pale twins (tab20 pairs each colour
    with a pastel one that reads as the same); past ten runs the dash pattern tells runs apart."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab10"](i % 10), "marker": MARKERS[i % len(MARKERS)],
            "linestyle": DASHES[i // 10 % len(DASHES)]}


def log_ticks(lo: float, hi: float) -> list[float]:
    """Round values between lo and hi for a log axis: every 1-9 × 10^k over about a decade, 1, 2, 3, 5
    or 1, 2, 5 over a few, powers of ten beyond. Under half a decade a log axis has at most one such value,
    so evenly spaced round numbers instead."""
    import matplotlib.ticker

    span = math.log10(hi / lo)
    if span < 0.5:
        ticks = matplotlib.ticker.MaxNLocator(6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
        return [float(f"{t:.6g}") for t in ticks if lo <= t <= hi]  # 0.9, not 0.8999999999
    subs = range(1, 10) if span <= 1.2 else (1, 2, 3, 5) if span <= 2 else (1, 2, 5) if span <= 3 else (1,)
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    ticks = [float(f"{m}e{k}") for k in range(first, last + 1) for m in subs]  # 3e-1, not 3 * 0.1
    return [t for t in ticks if lo <= t <= hi]


def plain(v: float) -> str:
    """A number as people write it: 0.05, 47.1, 27,182 (never 2.72e+04 or 10^4)."""
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def plain_log_axis(axis, suffix: str = "") -> None:
    """Put a log axis (ax.xaxis or ax.yaxis) on round ticks over its current view, labelled as plain
    numbers with an optional unit suffix ("×"); the minor ticks stay unlabelled. Call it once the
    data is drawn: the ticks are fixed for the view at that moment."""
    import matplotlib.ticker

    lo, hi = sorted(axis.get_view_interval())
    axis.set_major_locator(matplotlib.ticker.FixedLocator(log_ticks(lo, hi)))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: plain(v) + suffix))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def log_if_spread(ax, values: list[float], factor: float = 4.0) -> None:
    """A log y axis with plain ticks when the values span more than `factor` (one diverged run must
    not flatten the others); otherwise the linear axis as it is."""
    lo, hi = min(values), max(values)
    if lo > 0 and hi > factor * lo:
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)


def save(fig, path, dpi: int = 100) -> None:
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
