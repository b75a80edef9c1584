"""`slimlm report`: one Markdown page comparing output folders side by side, with plots.

Every command that writes a model leaves a report.json; each command records its budget, parameters
and quality under its own keys (and runs from older slimlm versions under older ones). `describe`
turns any of them into one flat row; `render` lays the rows out; `write` publishes page and plots
together. Nothing here loads a model: the numbers come from report.json, metrics.jsonl, and the
sizes and headers of the weight files.
"""
from __future__ import annotations

import datetime
import json
import shutil
import struct
import tempfile
from pathlib import Path

from .. import markdown as md
from ..errors import SlimlmError, reading, writing
from ..output import perplexity_key, spent
from ..formats.quantized import describe_group
from ..eval.tasks import scores


FIX = "run the command that wrote the folder again, or leave the folder out"


def _read_report(folder: Path) -> dict:
    if not folder.exists():
        raise SlimlmError(f"run folder {folder} does not exist")
    if not folder.is_dir():
        raise SlimlmError(f"{folder} is not a folder: give slimlm output folders")
    path = folder / "report.json"
    if not path.is_file():
        raise SlimlmError(f"{folder} has no report.json: not an output folder of slimlm prune/train/finetune/quantize")
    with reading(path, "run report", FIX):
        report = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(report, dict):
        raise SlimlmError(f"run report {path} is not a JSON object: {FIX}")
    return report


def _history(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    with reading(path, "training log", FIX):
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        bad = next((r for r in records if not isinstance(r, dict) or not isinstance(r.get("step"), int)), None)
        if bad is not None:
            raise ValueError(f"a record without its step: {str(bad)[:40]}")
    return records


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (8-byte length, then JSON), without reading the data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _numel(shape: list[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def _quantized_kept(folder: Path, report: dict) -> int | None:
    """Weights a quantized folder keeps: packed codes hold 8/bits weights per byte (a 2:4 layer's
    `values` only its kept half), plus the parameters that were not quantized."""
    path = folder / "quant.safetensors"
    if not path.is_file():
        return None
    per_byte = 8 // report["settings"]["bits"]
    shapes = _safetensors_shapes(path)
    codes = sum(_numel(s) for k, s in shapes.items() if k.endswith((".values", ".codes")))
    return codes * per_byte + report["sizes"]["other_parameters"]


def _parameters(folder: Path, report: dict) -> tuple[int | None, int | None]:
    """(non-zero parameters, dense parameters) of the whole model."""
    if "parameters" in report:  # slimlm train / finetune
        p = report["parameters"]
        return p.get("model_nonzero"), p.get("model_dense")
    if "totals" in report:  # slimlm prune, and sparse training runs of earlier versions
        t = report["totals"]
        return t.get("model_nonzero"), t.get("model_parameters")
    if report.get("command") == "quantize":
        z = report["sizes"]
        return _quantized_kept(folder, report), z["target_weights"] + z["other_parameters"]
    return None, None


def _quality(report: dict) -> tuple[str | None, float | None, str | None]:
    """(metric, value, what it was measured on): the run's own evaluation of its result."""
    command = report.get("command")
    if command in ("prune", "quantize"):
        ev = report.get("evaluation", {}).get("pruned" if command == "prune" else "quantized")
        if ev:
            return "perplexity", ev["perplexity"], f"{ev['data']} ({ev['windows']}×{ev['seqlen']})"
        return None, None, None
    metric = report.get("validation_metric") or ("val_ppl" if report.get("model_kind") == "causal-lm" else None)
    value = report.get("final_val", report.get("final_val_ppl"))
    if value is None and metric:
        value = report.get("final", {}).get(metric, report.get(f"best_{metric}"))
    if value is None:
        return None, None, None
    data = report.get("recipe", {}).get("data", {})
    where = data.get("valid") or "validation"
    if metric == "val_ppl":
        return "perplexity", value, f"{where} ({data.get('eval_windows')}×{data.get('seqlen')})"
    return "accuracy", value, where


def _dense_quality(report: dict) -> float | None:
    """The dense model's perplexity on the data the run's own evaluation used: slimlm prune measures
    both (the reference line of the quality plot); other commands do not."""
    if report.get("command") != "prune":
        return None
    return report.get("evaluation", {}).get("dense", {}).get("perplexity")


def _budget(report: dict) -> str:
    command = report.get("command")
    if command == "quantize":
        s = report["settings"]
        return f"int{s['bits']}, {describe_group(s.get('group_size'))}"
    if report.get("sparsity"):
        return str(report["sparsity"])
    if report.get("keep") is not None:
        return f"keep {report['keep']:.0%}"
    return "dense"


def _method(report: dict) -> str:
    command = report.get("command", "?")
    if command == "quantize":
        return f"quantize {report['settings']['method']}"
    method = report.get("method")
    if command == "train" and method == "lpaf":
        lp = report["recipe"]["method"]["lpaf"]
        return f"lpaf ({lp['prune']}, {lp['factorization']})"
    if command == "train" and report.get("slorb_layers"):
        return f"{method} + SLoRB"
    return method if command in ("train", "finetune") or not method else f"{command} {method}"


def _base(report: dict) -> str:
    return str(report.get("base_model") or report.get("settings", {}).get("model") or "?")


def _details(report: dict) -> str:
    """What the run was given: data, steps, learning rate, seed, or calibration."""
    if "recipe" in report:
        r = report["recipe"]
        m = r["method"]
        parts = [f"trained on {md.code(r['data']['train'])}", f"{report.get('steps')} steps", f"lr {r['train']['lr']:g}",
                 f"seed {r['seed']}"]
        if report.get("sparsity"):
            parts.append(f"masks {md.text(m['mask_update'])}, init {md.text(m['init'])}")
        if m.get("distill", {}).get("enabled") and report.get("method") != "finetune":
            parts.append(f"distillation α={m['distill']['alpha']}")
        return ", ".join(parts)
    calib = report.get("calibration")
    if calib:
        return f"calibration: {calib['windows']}×{calib['seqlen']} tokens of {md.code(calib['data'])}, seed {calib['seed']}"
    return "no calibration data"


def describe(folder: str | Path) -> dict:
    """One run as a flat row. Fields it cannot know are None."""
    folder = Path(folder)
    report = _read_report(folder)
    history = _history(folder)
    with reading(folder / "report.json", "run report", FIX):  # a field of the wrong type or shape
        return _row(folder, report, history)


def _row(folder: Path, report: dict, history: list[dict]) -> dict:
    kept, dense = _parameters(folder, report)
    metric, value, where = _quality(report)
    tokens, seconds = spent(report)
    return {
        "path": str(folder), "command": report.get("command"), "method": _method(report), "budget": _budget(report),
        "base_model": _base(report), "model_kind": report.get("model_kind"),
        "kept": kept, "dense": dense, "weight_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "metric": metric, "value": value, "evaluated_on": where, "dense_value": _dense_quality(report), "tokens": tokens, "seconds": seconds,
        "tasks": report.get("lm_eval", {}), "history": history, "details": _details(report),
        "evals": report.get("slimlm_eval", {}),
    }


def _protocol(ev: dict) -> str:
    return f"{ev['data']} ({ev['windows']}×{ev['seqlen']}, BOS {ev.get('bos', 'stream')})"


def like_with_like(rows: list[dict], dense: dict | None = None) -> str | None:
    """Where every run has a `slimlm eval --data` perplexity measured the same way (data, window length,
    windows, BOS), show that one instead of each run's own evaluation, and the dense model's `slimlm eval
    --json` result as the reference when it was measured the same way. Returns the protocol used, or None."""
    shared = set.intersection(*(set(r["evals"]) for r in rows)) if rows else set()
    if not shared:
        return None
    key = max(shared, key=lambda k: (rows[0]["evals"][k]["windows"], k))  # the most windows: the best estimate
    for r in rows:
        ev = r["evals"][key]
        r.update(metric="perplexity", value=ev["perplexity"], evaluated_on=_protocol(ev), dense_value=None)
        if dense is not None and perplexity_key(dense) == key:
            r["dense_value"], r["dense_name"] = dense["perplexity"], dense.get("model", "model")
    return _protocol(rows[0]["evals"][key])


def short_names(paths: list[str]) -> list[str]:
    """Each folder's name, with as many parent folders as it takes to tell it from the others."""
    parts = [Path(p).resolve().parts for p in paths]
    names = []
    for i, own in enumerate(parts):
        depth = 1
        while depth < len(own) and any(other[-depth:] == own[-depth:] for j, other in enumerate(parts) if j != i):
            depth += 1
        names.append("/".join(own[-depth:]))
    return names


def _task_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) pairs present in any run, in the order first seen."""
    columns = []
    for row in rows:
        for task, r in row["tasks"].items():
            columns += [(task, metric) for metric, _, _ in scores(r) if (task, metric) not in columns]
    return columns


def _fmt_count(n) -> str:
    return "—" if n is None else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**24 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def _fmt_seconds(s) -> str:
    if s is None:
        return "—"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _fmt_task(r: dict | None, metric: str) -> str:
    found = [(value, err) for m, value, err in scores(r) if m == metric] if r else []
    if not found:
        return "—"
    value, err = found[0]
    return f"{value:.3f}" + (f" ± {err:.3f}" if err is not None else "")


def render(rows: list[dict], names: list[str], plots: dict[str, str], shared: str | None = None) -> str:
    """The Markdown page; `plots` maps a caption to the PNG's path relative to the page; `shared`: the
    `slimlm eval` protocol every row's perplexity was measured with (like_with_like), if any."""
    tasks = _task_columns(rows)
    head = ["run", "method", "budget", "base model", "non-zero params", "of dense", "weights on disk",
            "perplexity", "accuracy", "evaluated on"] + [f"{t} ({m})" for t, m in tasks] + ["tokens", "time"]
    how = (f"Perplexity: every run measured the same way by `slimlm eval` ({shared})" if shared else
           "Perplexity and accuracy are each run's own evaluation (the data and windows are in *evaluated on*: "
           "compare rows measured on the same data; `slimlm eval --data` on every folder makes them comparable)")
    lines = ["# slimlm run report", "",
             f"{len(rows)} runs, compared {datetime.date.today().isoformat()}. {how}; task columns are lm-evaluation-harness scores (`slimlm eval --tasks`), ± standard error. "
             "*tokens*: training tokens, or calibration tokens for one-shot pruning and quantization.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in zip(names, rows):
        fraction = f"{r['kept'] / r['dense']:.1%}" if r["kept"] is not None and r["dense"] else "—"
        cells = [md.cell(name), md.cell(r["method"]), md.cell(r["budget"]), md.code(r["base_model"]),
                 _fmt_count(r["kept"]), fraction, _fmt_bytes(r["weight_bytes"]),
                 f"{r['value']:.2f}" if r["metric"] == "perplexity" else "—",
                 f"{r['value']:.3f}" if r["metric"] == "accuracy" else "—",
                 md.code(r["evaluated_on"]) if r["evaluated_on"] else "—"]
        cells += [_fmt_task(r["tasks"].get(t), m) for t, m in tasks]
        cells += [_fmt_count(r["tokens"]) if r["tokens"] else "—", _fmt_seconds(r["seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    for caption, png in plots.items():
        lines += ["", f"## {caption}", "", f"![{caption}]({png})"]
    lines += ["", "## Runs", ""]
    lines += [f"- **{md.text(n)}** ({md.code(r['path'])}): {r['details']}." for n, r in zip(names, rows)]
    return "\n".join(lines) + "\n"


def _read_dense(path: str) -> dict:
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SlimlmError(f"--dense {path}: not a readable `slimlm eval --json` file ({err.__class__.__name__})") from None
    if not isinstance(result, dict) or not {"perplexity", "data", "seqlen", "windows"} <= set(result):
        raise SlimlmError(f"--dense {path}: not a `slimlm eval --data ... --json` result (no perplexity with its protocol)")
    return result


def write(run_dirs: list[str], output: str, dense: str | None = None) -> Path:
    """Describe the runs, draw the plots, write OUTPUT (.md) and its PNGs beside it. Everything is
    written in a temporary folder first and moved into place at the end. `dense`: a `slimlm eval --json`
    file of the dense model, the reference where the runs were evaluated the same way."""
    from .plots import plot_curves, plot_quality

    if not run_dirs:
        raise SlimlmError("no run folders given")
    page = Path(output)
    if page.suffix.lower() != ".md":
        raise SlimlmError(f"--output {output}: expected a .md file")
    if not page.parent.is_dir():
        raise SlimlmError(f"folder of {output} does not exist: create it first or choose another --output")
    rows = [describe(d) for d in run_dirs]
    names = short_names(run_dirs)
    reference = _read_dense(dense) if dense else None
    shared = like_with_like(rows, reference)
    if reference is not None and (shared is None or rows[0]["dense_value"] is None):
        raise SlimlmError(f"--dense {dense} was not measured as the runs were (every run needs a `slimlm eval --data` "
                          f"result with the same data, --seqlen, windows and BOS; shared: {shared or 'none'})")
    with writing(page):
        tmp = Path(tempfile.mkdtemp(prefix=f".{page.stem}.tmp-", dir=page.parent))
    try:
        with writing(page):
            plots = {}
            quality = f"{page.stem}-quality.png"
            if plot_quality(rows, names, tmp / quality):
                plots["Quality of each run against dense"] = quality
            curves = f"{page.stem}-curves.png"
            if plot_curves(rows, names, tmp / curves):
                plots["Training curves"] = curves
            (tmp / page.name).write_text(render(rows, names, plots, shared))
            for png in plots.values():  # the page last: it never points at a missing picture
                (tmp / png).replace(page.parent / png)
            (tmp / page.name).replace(page)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return page
