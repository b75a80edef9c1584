"""Block-wise sparse reconstruction against one-shot pruning and as a warm start for AST (issue 15).

On smollm2-135m, calibration from sotu/train.txt, test perplexity on sotu/test.txt in 1024-token windows
(the one-shot protocol of docs/benchmarks.md). Rows (each a `slimlm prune` or `slimlm train` run through
the same code the CLI uses):

    sparsegpt / wanda              one-shot 2:4
    sparsegpt+rc / wanda+rc        + block-wise reconstruction (fixed mask, dense targets)
    sparsegpt+rc-adaptive          + AST's adaptive N:M refresh inside each block
    sparsegpt+rc-local             targets: the dense block on the compressed inputs (no error correction)
    sparsegpt-50% / +rc            50% unstructured
    ast<-sparsegpt / ast<-rc       `slimlm train --recipe ast` for --ast-steps from the one-shot start and
                                   from the reconstructed start, the dense model as teacher, equal tokens

Resumable: a row already in OUT.json is skipped. Each row records method, sparsity, calib_tokens,
train_tokens, test_ppl and seconds (wall time of the pruning / reconstruction / training itself).

    nohup python benchmarks/reconstruct.py > reconstruct.log 2>&1 &
"""
import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from slimlm import data, models, pruning
from slimlm.eval.perplexity import perplexity
from slimlm.recipe import resolve
from slimlm.train.job import run as train_run

MODEL = "smollm2-135m"


def prune_rows(args) -> dict:
    """name -> oneshot settings overrides."""
    rc = {"reconstruct": True, "reconstruct_steps": args.steps, "reconstruct_batch": args.batch,
          "reconstruct_lr": args.lr}
    return {
        "sparsegpt": {"method": "sparsegpt"},
        "wanda": {"method": "wanda"},
        "sparsegpt+rc": {"method": "sparsegpt", **rc},
        "wanda+rc": {"method": "wanda", **rc},
        "sparsegpt+rc-adaptive": {"method": "sparsegpt", **rc, "reconstruct_mask": "adaptive"},
        "sparsegpt+rc-local": {"method": "sparsegpt", **rc, "reconstruct_target": "local"},
        "sparsegpt-50%": {"method": "sparsegpt", "sparsity": "0.5"},
        "sparsegpt-50%+rc": {"method": "sparsegpt", "sparsity": "0.5", **rc},
    }


def test_ppl(folder: str, test: str, windows: int | None) -> float:
    loaded = models.load(folder)
    stream = data.load_tokens(loaded.tokenizer, test)
    return perplexity(loaded.model, stream, 1024, max_windows=windows, bos="stream")["perplexity"]


def table(rows: list[dict]) -> str:
    lines = ["| row | sparsity | calibration tokens | training tokens | test perplexity (1024) | block error before → after | wall time |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        err = (f"{r['mean_error_before']:.4f} → {r['mean_error_after']:.4f}" if r.get("mean_error_before") is not None
               else "—")
        lines.append(f"| {r['method']} | {r['sparsity'] or 'dense'} | {r['calib_tokens']:,} | {r['train_tokens']:,} | "
                     f"{r['test_ppl']:.2f} | {err} | {r['seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/sotu")
    ap.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    ap.add_argument("--steps", type=int, default=64, help="reconstruction steps per block")
    ap.add_argument("--batch", type=int, default=4, help="reconstruction windows per step")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--ast-steps", type=int, default=60, help="AST steps from each start (0: skip those rows)")
    ap.add_argument("--rows", default=None, help="comma-separated subset of the row names")
    ap.add_argument("--test-windows", type=int, default=None)
    ap.add_argument("--runs", default="runs/bench-reconstruct")
    ap.add_argument("--out", default="benchmarks/results/reconstruct")
    ap.add_argument("--table", action="store_true", help="print OUT.json as the Markdown table of docs/benchmarks.md")
    args = ap.parse_args()
    if args.table:
        return print(table(json.loads(Path(args.out + ".json").read_text())))
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    results = Path(args.out + ".json")
    rows = json.loads(results.read_text()) if results.exists() else []
    done = {r["method"] for r in rows}
    test = f"{args.data}/test.txt"
    calib_tokens = args.nsamples * args.seqlen
    wanted = set(args.rows.split(",")) if args.rows else None

    def record(row: dict) -> None:
        rows.append({**row, "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                     "threads": torch.get_num_threads(), "torch": torch.__version__})
        results.write_text(json.dumps(rows, indent=2))
        print(json.dumps(rows[-1]), flush=True)

    if "dense" not in done and (wanted is None or "dense" in wanted):
        record({"method": "dense", "sparsity": None, "calib_tokens": 0, "train_tokens": 0,
                "test_ppl": test_ppl(MODEL, test, args.test_windows), "seconds": 0.0})
    for name, extra in prune_rows(args).items():
        if name in done or (wanted and name not in wanted):
            continue
        settings = pruning.resolve_settings(model=MODEL, calib=f"{args.data}/train.txt", nsamples=args.nsamples,
                                            seqlen=args.seqlen, seed=0, **extra)
        folder = runs / name
        report = pruning.run(settings, str(folder), overwrite=True)
        rec = report.get("reconstruction") or {}
        record({"method": name, "sparsity": report["sparsity"], "calib_tokens": calib_tokens, "train_tokens": 0,
                "test_ppl": test_ppl(str(folder), test, args.test_windows), "seconds": report["prune_seconds"],
                "mean_error_before": rec.get("mean_error_before"), "mean_error_after": rec.get("mean_error_after"),
                "reconstruction": {k: rec[k] for k in ("steps", "batch", "lr", "mask", "target")} if rec else None})
    if args.ast_steps:
        for name, start in (("ast<-sparsegpt", "sparsegpt"), ("ast<-sparsegpt+rc", "sparsegpt+rc")):
            if name in done or (wanted and name not in wanted) or not (runs / start).is_dir():
                continue
            recipe = resolve("ast", [f"model={runs / start}", f"method.distill.teacher={MODEL}", "method.init=magnitude",
                                     f"data.train={args.data}/train.txt", f"train.steps={args.ast_steps}",
                                     f"train.save_every={args.ast_steps}", f"train.eval_every={args.ast_steps}"])
            folder = runs / name.replace("<-", "-from-")
            start_time = time.perf_counter()
            report = train_run(recipe, str(folder), overwrite=True)
            record({"method": name, "sparsity": "2:4", "calib_tokens": calib_tokens, "train_tokens": report["tokens_seen"],
                    "test_ppl": test_ppl(str(folder), test, args.test_windows),
                    "seconds": time.perf_counter() - start_time})


if __name__ == "__main__":
    main()
