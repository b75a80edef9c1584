"""One-shot pruning benchmark: dense, magnitude, Wanda, SparseGPT at 2:4 and 50% unstructured.

Protocol (issue 2): smollm2-135m; calibration 64 windows x 1024 tokens from sotu/train.txt drawn
with seed 0; perplexity on sotu/test.txt in non-overlapping 1024-token windows. Writes a JSON and a
markdown table; paste the table into docs/benchmarks.md with the command, machine and date.

    python benchmarks/oneshot.py --data ../shared/data/sotu --out benchmarks/results/oneshot
"""
import argparse
import datetime
import json
import os
import platform
import time

import torch

from slimlm import data, models
from slimlm.eval.perplexity import perplexity
from slimlm.eval.layers import totals
from slimlm.prune import prune
from slimlm.ops.sparsity import parse_sparsity


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/sotu")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--sparsities", default="2:4,0.5")
    ap.add_argument("--out", default="benchmarks/results/oneshot")
    ap.add_argument("--append", action="store_true", help="add rows to an existing OUT.json (dense is not re-run)")
    args = ap.parse_args()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

    loaded = models.load(args.model)
    model, tok = loaded.model, loaded.tokenizer
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = data.load_tokens(tok, os.path.join(args.data, "train.txt"))
    test = data.load_tokens(tok, os.path.join(args.data, "test.txt"))
    windows = data.calibration_windows(calib, args.nsamples, args.seqlen, args.seed)
    targets = models.find_targets(model)

    meta = {"command": "python benchmarks/oneshot.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
            "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "protocol": {"calibration": f"{args.nsamples} x {args.seqlen} tokens of train.txt, seed {args.seed}",
                         "test": {"data": test.source, "seqlen": args.seqlen, "windows": test.ids.numel() // args.seqlen,
                                  "bos_added": test.bos_added}}}
    rows = []
    if args.append:
        previous = json.load(open(args.out + ".json"))
        rows, meta = previous["rows"], {**previous["meta"], "appended": meta}
    else:
        dense = perplexity(model, test, args.seqlen)
        rows.append({"method": "dense", "sparsity": "-", "perplexity": dense["perplexity"], "measured_sparsity": 0.0,
                     "prune_seconds": 0.0})
        _write(args.out, meta, rows)
    for sp in args.sparsities.split(","):
        for method in args.methods.split(","):
            model.load_state_dict(dense_state)
            start = time.perf_counter()
            prune(model, targets, method, parse_sparsity(sp), windows)
            seconds = time.perf_counter() - start
            ev = perplexity(model, test, args.seqlen)
            rows.append({"method": method, "sparsity": sp, "perplexity": ev["perplexity"],
                         "measured_sparsity": totals(model, targets)["target_sparsity"], "prune_seconds": seconds})
            _write(args.out, meta, rows)  # after every row: a stopped run keeps what it measured


def _write(out, meta, rows):
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    lines = ["| method | sparsity | perplexity | measured sparsity | pruning time (s) |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['method']} | {r['sparsity']} | {r['perplexity']:.2f} | {r['measured_sparsity']:.4f} | {r['prune_seconds']:.0f} |"
              for r in rows]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
