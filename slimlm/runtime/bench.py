"""`slimlm bench`: latency and throughput of a compressed model against its dense reference.

Two kinds of rows, each measured for the dense and the compressed variant alternately in one run
(dense first on even repeats, compressed first on odd ones) so that a noisy machine slows both alike:

- layer rows: for every distinct (out, in, compression) of the target layers, the forward of one such
  layer on `batch` input rows (tokens in flight), dense layer vs the compressed layer's runnable form
  (slimlm/runtime/kernels.py says which kernel; the backend is in every row);
- model rows: the whole model on `batch` sequences of `seqlen` random tokens: prefill (one forward with
  the KV cache on) and decode (`decode_tokens` single-token steps on that cache), in tokens/s.

The speed-up of a row is the median over repeats of dense time / compressed time of the same repeat;
below 1 the compressed model is slower, and the row says so. Peak memory: on CUDA the peak of
torch.cuda.max_memory_allocated during the call above what was allocated before it (activations and
workspaces); on CPU it is not measured (see memory_measure). The weights held in memory are reported
for both variants on every device.
"""
from __future__ import annotations

import math
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .. import devices, models, output, pruning
from ..errors import SlimlmError
from . import kernels
from .kernels import backend_summary, tensor_bytes, to_runnable

DEFAULTS = {
    "model": None, "dense": None, "device": "auto", "dtype": None, "batch_sizes": [1, 4], "seqlens": [128],
    "layer_batches": [1, 16, 128, 1024], "decode_tokens": 8, "repeats": 5, "seed": 0, "sparse_kernel": "auto",
    "include": None, "ignore": None, "layers": True, "whole_model": True, "min_layer_seconds": 0.02,
}


def resolve_settings(**given) -> dict:
    settings = pruning.resolve_settings(DEFAULTS, **given)
    if not settings["model"] or not settings["dense"]:
        raise SlimlmError("bench needs the compressed model and its dense reference: pass --model and --dense")
    for key in ("batch_sizes", "seqlens", "layer_batches"):
        if not settings[key] or any(int(v) < 1 for v in settings[key]):
            raise SlimlmError(f"--{key.replace('_', '-')} needs positive integers, got {settings[key]}")
    if settings["repeats"] < 1 or settings["decode_tokens"] < 0:
        raise SlimlmError("--repeats must be at least 1 and --decode-tokens at least 0")
    if settings["sparse_kernel"] not in kernels.SPARSE_KERNELS:
        raise SlimlmError(f"unknown --sparse-kernel '{settings['sparse_kernel']}': choose one of "
                          f"{', '.join(kernels.SPARSE_KERNELS)}")
    settings["device"] = devices.resolve(settings["device"], announce=True)
    if settings["dtype"] is None:  # the semi-structured kernels take half precision only
        settings["dtype"] = "float16" if settings["device"].startswith("cuda") else "float32"
    return settings


# ---------------------------------------------------------------------------------------------
# measuring one call

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_measure(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA: peak torch.cuda.max_memory_allocated during the call minus the allocation before it"
    # Tried and dropped: the rise of the process's peak resident set (VmHWM) during the call. The
    # allocator keeps freed memory, so it read 0 for every call but the first of a process (whichever
    # variant that was), even with glibc's mmap threshold pinned: a number that says nothing.
    return "CPU: not measured (the resident set does not show a call's own allocations); see weights_bytes"


def _reset_peak(device: torch.device) -> int | None:
    """Start a peak measurement; returns the baseline in bytes (None: not measured on this device)."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_above(device: torch.device, baseline: int | None) -> int | None:
    return None if baseline is None else torch.cuda.max_memory_allocated(device) - baseline


def timed(fn, device: torch.device, calls: int = 1, memory: bool = False) -> tuple[float, int | None]:
    """(seconds per call averaged over `calls` calls, peak memory above the start or None)."""
    baseline = _reset_peak(device) if memory else None
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    seconds = (time.perf_counter() - start) / calls
    return seconds, _peak_above(device, baseline) if memory else None


def compare(dense: Callable, compressed: Callable, device: torch.device, repeats: int, calls: int = 1,
            memory: bool = False) -> dict:
    """Time the two variants alternately. Each variant is a function that prepares (untimed) and returns
    the call to time: a decode timing needs a fresh prefilled cache every time. The speed-up is the
    median of the per-repeat ratios dense time / compressed time."""
    variants = {"dense": dense, "compressed": compressed}
    for prepare in variants.values():  # warm-up: first-call allocations and kernel choices are not timed
        prepare()()
    times = {"dense": [], "compressed": []}
    peaks = {"dense": None, "compressed": None}
    for r in range(repeats):
        order = ("dense", "compressed") if r % 2 == 0 else ("compressed", "dense")
        for which in order:
            # memory: each variant once, in the repeat where it runs first (right after the other
            # variant's call), so neither inherits allocations the other paid for
            measure = memory and which == order[0] and r < 2
            seconds, peak = timed(variants[which](), device, calls, memory=measure)
            times[which].append(seconds)
            if peak is not None:
                peaks[which] = peak
    ratios = [d / c for d, c in zip(times["dense"], times["compressed"])]
    return {"dense_seconds": statistics.median(times["dense"]),
            "compressed_seconds": statistics.median(times["compressed"]),
            "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "dense_peak_bytes": peaks["dense"], "compressed_peak_bytes": peaks["compressed"]}


def verdict(speedup: float, low: float | None = None, high: float | None = None) -> str:
    """Faster or slower by the median ratio, unless the repeats' ratios fall on both sides of 1: on a
    noisy machine such a row does not show a difference, and it says so instead of picking a side."""
    if low is not None and high is not None and low < 1 < high:
        return f"no clear difference: {speedup:.2f}× ({low:.2f}–{high:.2f})"
    return f"faster: {speedup:.2f}×" if speedup >= 1 else f"slower than dense: {speedup:.2f}×"


def clearly_slower(row: dict) -> bool:
    return row["speedup"] < 1 and not row["speedup_min"] < 1 < row["speedup_max"]


# ---------------------------------------------------------------------------------------------
# the compressed model in runnable form

def plan_layers(loaded, settings: dict) -> list[dict]:
    """Per target layer of the compressed model: name, (out, in), kind, runnable module, backend."""
    return kernels.plan_layers(loaded.model, models.resolve(settings["model"])[0], settings["sparse_kernel"],
                               settings["include"], settings["ignore"])


# ---------------------------------------------------------------------------------------------
# the rows

@torch.inference_mode()
def layer_rows(plan: list[dict], dense_model: nn.Module, settings: dict, device, dtype, progress) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for layer in plan:
        groups.setdefault((*layer["shape"], layer["kind"]), []).append(layer)
    rows = []
    for (out_f, in_f, kind), members in groups.items():
        first = members[0]
        try:
            dense_layer = dense_model.get_submodule(first["name"])
        except AttributeError:
            raise SlimlmError(f"the dense model has no layer '{first['name']}': pass as --dense the model the "
                              "compressed one was made from") from None
        if tuple(models.weight_matrix(dense_layer).shape) != (out_f, in_f):
            raise SlimlmError(f"layer '{first['name']}' is {out_f}x{in_f} in the compressed model but "
                              f"{tuple(models.weight_matrix(dense_layer).shape)} in --dense: not the same architecture")
        for batch in settings["layer_batches"]:
            x = torch.randn(batch, in_f, device=device, dtype=dtype,
                            generator=torch.Generator(device=device).manual_seed(settings["seed"]))
            dense_call, compressed_call = (lambda: dense_layer(x)), (lambda: first["module"](x))
            dense_call()
            once, _ = timed(dense_call, device)
            calls = max(1, math.ceil(settings["min_layer_seconds"] / max(once, 1e-7)))  # small layers: many calls per timing
            result = compare(lambda: dense_call, lambda: compressed_call, device, settings["repeats"], calls)
            rows.append({"row": "layer", "shape": [out_f, in_f], "kind": kind, "layers": len(members),
                         "example": first["name"], "batch": batch, "backend": first["backend"],
                         "dense_backend": "dense matmul", "calls_per_timing": calls, **result,
                         "verdict": verdict(result["speedup"], result["speedup_min"], result["speedup_max"])})
            progress.update(1)
    return rows


@torch.inference_mode()
def model_rows(dense_model, compressed_model, kind: str, settings: dict, device, backend: str, progress) -> list[dict]:
    vocab = dense_model.config.vocab_size
    causal = kind == "causal-lm"
    rows = []
    for seqlen in settings["seqlens"]:
        for batch in settings["batch_sizes"]:
            gen = torch.Generator().manual_seed(settings["seed"])
            ids = torch.randint(vocab, (batch, seqlen), generator=gen).to(device)
            steps = torch.randint(vocab, (batch, settings["decode_tokens"]), generator=gen).to(device)

            def prefill(model):
                return lambda: model(input_ids=ids, **({"use_cache": True} if causal else {}))

            def decode(model):
                cache = model(input_ids=ids, use_cache=True).past_key_values  # untimed: a fresh prefix each time
                return lambda: _decode(model, cache, steps)

            result = compare(lambda: prefill(dense_model), lambda: prefill(compressed_model), device,
                             settings["repeats"], memory=True)
            rows.append(_tokens_row("prefill", batch, seqlen, batch * seqlen, result, backend))
            progress.update(1)
            if causal and settings["decode_tokens"]:
                result = compare(lambda: decode(dense_model), lambda: decode(compressed_model), device,
                                 settings["repeats"], memory=True)
                rows.append(_tokens_row("decode", batch, seqlen, batch * settings["decode_tokens"], result, backend))
                progress.update(1)
    return rows


def _decode(model, cache, steps: torch.Tensor) -> None:
    for i in range(steps.shape[1]):
        cache = model(input_ids=steps[:, i : i + 1], past_key_values=cache, use_cache=True).past_key_values


def _tokens_row(phase: str, batch: int, seqlen: int, tokens: int, result: dict, backend: str) -> dict:
    return {"row": phase, "batch": batch, "seqlen": seqlen, "tokens": tokens, "backend": backend,
            "dense_tokens_per_s": tokens / result["dense_seconds"],
            "compressed_tokens_per_s": tokens / result["compressed_seconds"], **result,
            "verdict": verdict(result["speedup"], result["speedup_min"], result["speedup_max"])}


# ---------------------------------------------------------------------------------------------
# the job

def run(settings: dict) -> dict:
    """Load both models, build the compressed one's runnable form, measure. Returns the result dict."""
    device = torch.device(devices.resolve(settings["device"]))
    if settings["sparse_kernel"] == "semi-structured" and device.type != "cuda":
        raise SlimlmError("--sparse-kernel semi-structured needs a CUDA GPU (cuSPARSELt/CUTLASS): PyTorch has no "
                          "2:4 kernel for CPUs; use --sparse-kernel auto or dense to time 2:4 layers as dense matmuls")
    torch.manual_seed(settings["seed"])
    dtype = models.DTYPES.get(settings["dtype"])
    compressed = models.load(settings["model"], dtype=settings["dtype"], device=str(device))
    dense = models.load(settings["dense"], dtype=settings["dtype"], device=str(device))
    if compressed.kind != dense.kind:
        raise SlimlmError(f"--model is a {compressed.kind} model but --dense a {dense.kind} one: compare like with like")
    plan = plan_layers(compressed, settings)
    probe = torch.randint(dense.model.config.vocab_size, (1, 16),
                          generator=torch.Generator().manual_seed(settings["seed"])).to(device)
    with torch.inference_mode():
        reference = output.outputs_of(compressed.model, probe)
        runnable = to_runnable(compressed.model, plan)
        kernel_diff = (output.outputs_of(runnable, probe) - reference).abs().max().item()
    backend = backend_summary(plan)

    shapes = {(*layer["shape"], layer["kind"]) for layer in plan}
    per_config = 2 if compressed.kind == "causal-lm" and settings["decode_tokens"] else 1
    total = (len(shapes) * len(settings["layer_batches"]) if settings["layers"] else 0) + (
        per_config * len(settings["batch_sizes"]) * len(settings["seqlens"]) if settings["whole_model"] else 0)
    rows = []
    with tqdm(total=total, desc="bench", unit="row") as progress:
        if settings["layers"]:
            rows += layer_rows(plan, dense.model, settings, device, dtype, progress)
        if settings["whole_model"]:
            rows += model_rows(dense.model, runnable, compressed.kind, settings, device, backend, progress)
    return {
        "command": "bench", "model": settings["model"], "dense": settings["dense"], "settings": settings,
        "device": _device_name(device), "threads": torch.get_num_threads(), "memory_measure": memory_measure(device),
        "backends": backend, "kernel_check_max_abs_logit_diff": kernel_diff,
        "weights_bytes": {"dense": tensor_bytes(dense.model), "compressed": tensor_bytes(runnable)},
        "layers": [{k: (list(v) if k == "shape" else v) for k, v in layer.items() if k != "module"} for layer in plan],
        "rows": rows, "versions": output.versions(),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {name}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------
# presenting

def format_table(result: dict) -> str:
    lines = [f"{'row':<8} {'shape / batch x seqlen':<26} {'kind':<12} {'dense':>14} {'compressed':>14} "
             f"{'peak MB d/c':>13}  verdict"]
    for row in result["rows"]:
        if row["row"] == "layer":
            what = f"{row['shape'][0]}x{row['shape'][1]} b={row['batch']}"
            dense, comp = f"{row['dense_seconds'] * 1e3:.3f} ms", f"{row['compressed_seconds'] * 1e3:.3f} ms"
            kind = row["kind"]
        else:
            what = f"b={row['batch']} s={row['seqlen']}"
            dense, comp = f"{row['dense_tokens_per_s']:.1f} tok/s", f"{row['compressed_tokens_per_s']:.1f} tok/s"
            kind = "model"
        peaks = [row.get("dense_peak_bytes"), row.get("compressed_peak_bytes")]
        peak = "/".join("-" if b is None else f"{b / 1e6:.1f}" for b in peaks) if row["row"] != "layer" else ""
        lines.append(f"{row['row']:<8} {what:<26} {kind:<12} {dense:>14} {comp:>14} {peak:>13}  {row['verdict']}")
    backends = sorted({(r["kind"], r["backend"]) for r in result["rows"] if r["row"] == "layer"})
    lines.append("")
    lines += [f"backend ({kind}): {backend}" for kind, backend in backends]
    lines.append(f"whole model: {result['backends']}")
    return "\n".join(lines)


def summary(result: dict) -> list[str]:
    """Plain sentences: where the compressed model is faster and where it is slower."""
    out = []
    for phase in ("layer", "prefill", "decode"):
        rows = [r for r in result["rows"] if r["row"] == phase]
        if not rows:
            continue
        slower = [r for r in rows if clearly_slower(r)]
        unclear = [r for r in rows if r["speedup_min"] < 1 < r["speedup_max"]]
        speedups = sorted(r["speedup"] for r in rows)
        out.append(f"{phase}: speed-up {speedups[0]:.2f}x to {speedups[-1]:.2f}x over {len(rows)} rows; "
                   + (f"SLOWER than dense in {len(slower)} of them (worst {min(r['speedup'] for r in slower):.2f}x)" if slower
                      else "never clearly slower than dense")
                   + (f"; no clear difference in {len(unclear)} (repeats on both sides of 1)" if unclear else ""))
    return out


def speedup_series(result: dict, which: str) -> dict[str, list[tuple[int, float, float, float]]]:
    """{line label: [(batch, median speed-up, min, max)]} of the layer rows (one line per layer shape)
    or the whole-model rows (one per phase and sequence length). Results of versions that did not
    keep the repeats' range have min = max = median."""
    lines: dict[str, list] = {}
    for row in result["rows"]:
        if (row["row"] == "layer") != (which == "layer"):
            continue
        label = (f"{row['shape'][0]}x{row['shape'][1]} {row['kind']}" if which == "layer"
                 else f"{row['row']} s={row['seqlen']}")
        lines.setdefault(label, []).append((row["batch"], row["speedup"], row.get("speedup_min", row["speedup"]),
                                            row.get("speedup_max", row["speedup"])))
    return {label: sorted(points) for label, points in lines.items()}


def _draw_speedups(ax, lines: dict[str, list]) -> None:
    """Median speed-up with the min-max range of the repeats as error bars. Lines at the same batch
    are nudged apart sideways so that their bars do not cover each other."""
    from ..report.plotting import style

    for j, (label, points) in enumerate(lines.items()):
        nudge = 2 ** (0.06 * (j - (len(lines) - 1) / 2))
        xs = [b * nudge for b, _, _, _ in points]
        ys = [s for _, s, _, _ in points]
        below, above = [s - lo for _, s, lo, _ in points], [hi - s for _, s, _, hi in points]
        s = style(j)
        ax.errorbar(xs, ys, yerr=[below, above], color=s["color"], marker=s["marker"], linestyle=s["linestyle"],
                    markersize=5, capsize=3, label=label)


def figure(result: dict):
    """Speed-up vs batch size, layer shapes and whole model side by side (a panel only where there are
    rows). Both axes are logarithmic (0.5× and 2× equally far from 1×) with plain tick labels."""
    import matplotlib.ticker

    from ..report.plotting import plain_log_axis, pyplot

    panels = [(which, title, speedup_series(result, which))
              for which, title in (("layer", "target layer shapes"), ("model", "whole model"))]
    panels = [p for p in panels if p[2]]
    plt = pyplot()
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4.5), squeeze=False)
    for ax, (which, title, lines) in zip(axes.flat, panels):
        _draw_speedups(ax, lines)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        points = [p for pts in lines.values() for p in pts]
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(sorted({b for b, *_ in points})))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        batches = [p[0] for p in points]
        ax.set_xlim(min(batches) / 1.5, max(batches) * 1.5)  # room for the nudges, even with one batch size
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis, "×")
        ax.set_xlabel("batch (input rows)" if which == "layer" else "batch (sequences)")
        ax.set_ylabel("speed-up over dense (above 1× faster)")
        ax.set_title(f"{title}: median, bars min–max of {result['settings']['repeats']} repeats", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['model']} vs {result['dense']} on {result['device']}", fontsize=9)
    fig.tight_layout()
    return fig


def plot(result: dict, path: str) -> None:
    from ..report.plotting import save

    save(figure(result), path, dpi=120)
