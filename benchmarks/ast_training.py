"""AST benchmark: smollm2-135m at 2:4 on State of the Union text, every training method at one token budget.

Rows: dense and the one-shot methods (from benchmarks/results/oneshot.json when present: same model,
same test protocol), then `naive`, `gmp`, `ast`, `ast-slorb` trained through `slimlm train` with
the same number of steps (same tokens). Training uses sotu/train.txt, validation perplexity on
sotu/valid.txt is logged during training, and the reported number is perplexity on sotu/test.txt in
1024-token windows. Also measures the throughput ratio of an AST step to a dense step with the same KD.

    python benchmarks/ast_training.py --data ../shared/data/sotu --minutes-per-run 15
"""
import argparse
import copy
import datetime
import json
import os
import platform
import time
from pathlib import Path

import tempfile

import torch
import transformers

import slimlm
from slimlm import data, models, recipe
from slimlm.evaluate import perplexity
from slimlm.train.distill import distill_loss, make_teacher
from slimlm.train.engine import Hooks, Trainer
from slimlm.train.job import run as train_run
from slimlm.train.sparse import SparseTraining

METHODS = ["naive", "gmp", "ast", "ast-slorb"]


class DenseKD(Hooks):
    """Dense training with the same distillation loss: the reference for the step-time ratio."""

    def __init__(self, recipe):
        self.distill = recipe["method"]["distill"]

    def setup(self, trainer):
        self.teacher = make_teacher(trainer.model, self.distill)

    def loss(self, model, batch):
        return distill_loss(model, self.teacher, batch, self.distill)


def step_seconds(rec, hooks_factory, steps=4):
    loaded = models.load(rec["model"])
    stream = data.load_tokens(loaded.tokenizer, rec["data"]["valid"])
    r = copy.deepcopy(rec)
    r["train"]["steps"] = steps + 1
    trainer = Trainer(loaded.model, hooks_factory(r, loaded.tokenizer), r, stream, None, Path(tempfile.mkdtemp()))
    trainer.train(until=1)  # warm-up step
    start = time.perf_counter()
    trainer.train()
    return (time.perf_counter() - start) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/sotu")
    ap.add_argument("--minutes-per-run", type=float, default=15.0)
    ap.add_argument("--steps", type=int, help="fix the step count instead of deriving it from --minutes-per-run")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--runs", default="runs/bench-ast")
    ap.add_argument("--out", default="benchmarks/results/ast")
    ap.add_argument("--oneshot", default="benchmarks/results/oneshot.json")
    ap.add_argument("overrides", nargs="*", help="recipe overrides applied to every method")
    args = ap.parse_args()
    d = args.data
    common = [f"data.train={d}/train.txt", f"data.valid={d}/valid.txt", *args.overrides]
    base = recipe.resolve("ast", common)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    os.makedirs(args.runs, exist_ok=True)

    # 1. throughput: AST step vs dense step with the same KD
    t_dense = step_seconds(base, lambda r, tok: DenseKD(r))
    t_ast = step_seconds(base, lambda r, tok: SparseTraining(r, tok))
    steps = args.steps or max(10, int(args.minutes_per_run * 60 / t_ast))
    tokens = steps * base["train"]["batch_size"] * base["train"]["grad_accum"] * base["data"]["seqlen"]
    print(f"dense+KD step {t_dense:.2f}s, AST step {t_ast:.2f}s (ratio {t_dense / t_ast:.2f}); "
          f"budget {steps} steps = {tokens:,} tokens per method", flush=True)

    rows = []
    if os.path.exists(args.oneshot):
        for r in json.load(open(args.oneshot))["rows"]:
            if r["sparsity"] in ("-", "2:4"):
                rows.append({"method": r["method"] + ("" if r["method"] == "dense" else " (one-shot)"),
                             "test_ppl": r["perplexity"], "tokens": 0, "source": args.oneshot})

    test = None
    curves = {}
    for name in args.methods.split(","):
        out = Path(args.runs) / name
        rec = recipe.resolve(name, common + [f"train.steps={steps}", f"train.eval_every={max(1, steps // 6)}",
                                             f"train.save_every={steps + 1}"])
        start = time.perf_counter()
        report = train_run(rec, str(out), overwrite=True)
        seconds = time.perf_counter() - start
        model = slimlm.load(str(out))
        if test is None:
            tok = transformers.AutoTokenizer.from_pretrained(out)  # the tokenizer alone, not a second model
            test = data.load_tokens(tok, f"{d}/test.txt")
        ppl = perplexity(model, test, 1024)["perplexity"]
        final_val = [h["val_ppl"] for h in report_history(out) if "val_ppl" in h][-1]
        rows.append({"method": name, "test_ppl": ppl, "final_val_ppl": final_val, "tokens": tokens,
                     "train_seconds": seconds, "slorb_parameters": report.get("slorb_parameters", 0)})
        curves[name] = report_history(out)
        print(rows[-1], flush=True)
        _write(args, rows, curves, steps, tokens, t_dense, t_ast, base)


def report_history(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _write(args, rows, curves, steps, tokens, t_dense, t_ast, base):
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "torch": torch.__version__, "steps": steps, "tokens_per_method": tokens,
            "seqlen": base["data"]["seqlen"], "batch_size": base["train"]["batch_size"], "lr": base["train"]["lr"],
            "dense_kd_step_s": t_dense, "ast_step_s": t_ast, "ast_to_dense_throughput": t_dense / t_ast}
    json.dump({"meta": meta, "rows": rows}, open(args.out + ".json", "w"), indent=2)
    # the final validation number, not the best: GMP's best is from its early, still dense steps
    lines = [f"| method | training tokens | test perplexity (1024) | final valid perplexity ({base['data']['seqlen']}) |",
             "| --- | ---: | ---: | ---: |"]
    for r in rows:
        val = f"{r['final_val_ppl']:.2f}" if r.get("final_val_ppl") else "-"
        lines.append(f"| {r['method']} | {r['tokens']:,} | {r['test_ppl']:.2f} | {val} |")
    open(args.out + ".md", "w").write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, recs in curves.items():
        axes[0].plot([r["step"] for r in recs], [r["ce"] for r in recs], label=name)
        pts = [(r["step"], r["val_ppl"]) for r in recs if "val_ppl" in r]
        axes[1].plot(*zip(*pts), marker="o", label=name)
    axes[0].set(title="training cross-entropy", xlabel="step")
    axes[1].set(title="validation perplexity", xlabel="step", yscale="log")
    for ax in axes:
        ax.legend()
    fig.suptitle(f"{base['model']} {base['method']['sparsity']}, {tokens:,} tokens per method")
    fig.tight_layout()
    fig.savefig(args.out + "_curves.png", dpi=110)


if __name__ == "__main__":
    main()
