"""AST at equal budget: what each of its parts adds over plain fine-tuning of a one-shot mask (issue 12).

Every trained row starts from the same one-shot 2:4 mask (Wanda by default), sees the same tokens of
sotu/train.txt in the same order, and changes one thing from the row before it:

    naive           cross-entropy, fixed mask                       (recipe naive)
    fixed+kd        + distillation from the dense teacher          (naive + method.distill.enabled=true)
    ast-no-decay    + adaptive masks (refreshes, straight-through)  (recipe ast, method.decay.mode=none)
    ast             + annealed decay of pruned weights              (recipe ast)
    ast-slorb       + SLoRB side paths, X trainable                 (recipe ast-slorb)

plus the one-shot rows of benchmarks/results/oneshot.json (same model and test protocol). Reported:
perplexity on sotu/test.txt in 1024-token windows, the flip rate of every refresh, the decay achieved
(integrated lr*lambda and the pruned weights' RMS relative to the start), wall time and the median step
time of each row. The AST step against a dense step with the same distillation, measured in one run, is
benchmarks/ast_step_time.py's.

Resumable: a row already in the results file is skipped, an interrupted row resumes from its last
checkpoint. Results: OUT.json (a list of rows), OUT.md (the table), OUT_curves.png.

    nohup python benchmarks/ast_training.py --data ../shared/data/sotu --steps 245 > ast_budget.log 2>&1 &
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

import slimlm
from slimlm import data, recipe
from slimlm.eval.perplexity import perplexity
from slimlm.train import budget
from slimlm.train.job import checkpoint_dir
from slimlm.train.job import run as train_run


# name -> (recipe, overrides): each row changes one thing from the one before it
ROWS = {
    "naive": ("naive", []),
    "fixed+kd": ("naive", ["method.distill.enabled=true"]),
    "ast-no-decay": ("ast", ["method.decay.mode=none"]),
    "ast": ("ast", []),
    "ast-slorb": ("ast-slorb", []),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/sotu")
    ap.add_argument("--steps", type=int, default=250, help="optimizer steps per row (every row sees the same tokens)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    ap.add_argument("--init", default="wanda", help="the one-shot start of every row: wanda | sparsegpt | magnitude")
    ap.add_argument("--test-windows", type=int, default=None, help="limit the test perplexity to this many windows")
    ap.add_argument("--runs", default="runs/bench-ast-budget")
    ap.add_argument("--out", default="benchmarks/results/ast_budget")
    ap.add_argument("--oneshot", default="benchmarks/results/oneshot.json")
    ap.add_argument("overrides", nargs="*", help="recipe overrides applied to every row (e.g. train.device=cuda)")
    args = ap.parse_args()
    d = args.data
    common = [f"data.train={d}/train.txt", f"data.valid={d}/valid.txt", f"method.init={args.init}",
              f"train.steps={args.steps}", f"train.eval_every={max(1, args.steps // 5)}",
              f"train.save_every={max(1, args.steps // 5)}", *args.overrides]
    base = recipe.resolve("ast", common)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    os.makedirs(args.runs, exist_ok=True)
    tokens = args.steps * base["train"]["batch_size"] * base["train"]["grad_accum"] * base["data"]["seqlen"]
    meta = {"date": datetime.date.today().isoformat(), "machine": machine(base["train"]["device"]),
            "torch": torch.__version__, "model": base["model"], "init": args.init, "steps": args.steps,
            "seqlen": base["data"]["seqlen"], "batch_size": base["train"]["batch_size"], "lr": base["train"]["lr"],
            "bf16": budget.use_bf16(base["train"]["bf16"], base["train"]["device"])}
    results = Path(args.out + ".json")
    rows = [r for r in json.loads(results.read_text()) if r.get("steps") == args.steps] if results.exists() else []
    done = {r["method"] for r in rows}

    print(f"{args.steps} steps = {tokens:,} tokens per row", flush=True)

    test = None
    for name in args.rows.split(","):
        if name in done:
            continue
        name_recipe, extra = ROWS[name]
        rec = recipe.resolve(name_recipe, common + extra)
        out = Path(args.runs) / name
        checkpoints = sorted(checkpoint_dir(str(out)).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        resume = str(checkpoints[-1]) if checkpoints and not out.exists() else None
        start = time.perf_counter()
        if not out.exists():
            train_run(rec, str(out), overwrite=resume is None, resume=resume)
        seconds = time.perf_counter() - start
        report = json.loads((out / "report.json").read_text())
        history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        model = slimlm.load(str(out), device=rec["train"]["device"])
        if test is None:
            tok = transformers.AutoTokenizer.from_pretrained(out)  # the tokenizer alone, not a second model
            test = data.load_tokens(tok, f"{d}/test.txt")
        ppl = perplexity(model, test, 1024, max_windows=args.test_windows)["perplexity"]
        del model
        final = history[-1]
        step_s = statistics.median(h["step_seconds"] for h in history if "step_seconds" in h)
        rows.append({
            "method": name, "recipe": name_recipe, "overrides": extra, "tokens": report["tokens_seen"],
            "test_ppl": ppl, "final_val_ppl": next((h["val_ppl"] for h in reversed(history) if "val_ppl" in h), None),
            "seconds": seconds if not resume else None, "train_seconds": report["seconds"],
            "step_seconds": step_s,
            "flip_rates": [[h["step"], h["mask_flip_rate"]] for h in history if "mask_flip_rate" in h],
            "mask_interval": report.get("mask_interval"), "lambda_max": report.get("lambda_max"),
            "decay_integral": final.get("decay_integral"), "pruned_rms_ratio": final.get("pruned_rms_ratio"),
            "slorb_parameters": report.get("slorb_parameters", 0), **meta})
        print({k: rows[-1][k] for k in ("method", "tokens", "test_ppl", "step_seconds", "decay_integral")}, flush=True)
        _write(args, rows, base, tokens)
    _write(args, rows, base, tokens)


def machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{cpu}, {os.cpu_count()} cores"


def _write(args, rows, base, tokens):
    Path(args.out + ".json").write_text(json.dumps(rows, indent=2))
    lines = ["| method | training tokens | test perplexity (1024) | final valid perplexity | flips at first / last refresh "
             "| decay ∫lr·λ | pruned RMS vs start | median step | wall time |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    if os.path.exists(args.oneshot):
        for r in json.load(open(args.oneshot))["rows"]:
            if r["sparsity"] in ("-", "2:4"):
                name = r["method"] + ("" if r["method"] == "dense" else " (one-shot)")
                lines.append(f"| {name} | 0 | {r['perplexity']:.2f} | - | - | - | - | - | - |")

    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    for r in rows:
        flips = r["flip_rates"]
        flip = f"{100 * flips[0][1]:.2g}% / {100 * flips[-1][1]:.2g}%" if flips else "-"
        lines.append(f"| {r['method']} | {r['tokens']:,} | {r['test_ppl']:.2f} | {fmt(r['final_val_ppl'], '.2f')} | {flip} "
                     f"| {fmt(r['decay_integral'], '.3g')} | {fmt(r['pruned_rms_ratio'], '.2f')} "
                     f"| {r['step_seconds']:.2f} s | {fmt(r['train_seconds'] and r['train_seconds'] / 60, '.0f')} min |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    _plot(args, rows, base, tokens)


def _plot(args, rows, base, tokens):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, r in enumerate(rows):
        color = f"C{i}"  # one colour per row in every panel (the flip panel has no fixed-mask rows)
        metrics = Path(args.runs) / r["method"] / "metrics.jsonl"
        if not metrics.exists():
            continue
        recs = [json.loads(x) for x in metrics.read_text().splitlines()]
        steps = [h["step"] for h in recs]
        ce = [h["ce"] for h in recs]
        smooth = [sum(ce[max(0, i - 9): i + 1]) / len(ce[max(0, i - 9): i + 1]) for i in range(len(ce))]
        axes[0].plot(steps, smooth, color=color, label=r["method"])
        pts = [(h["step"], h["val_ppl"]) for h in recs if "val_ppl" in h]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", color=color, label=r["method"])
        if r["flip_rates"]:
            axes[2].plot([s for s, _ in r["flip_rates"]], [100 * f for _, f in r["flip_rates"]], marker=".", color=color, label=r["method"])
    axes[0].set(title="training cross-entropy (10-step mean)", xlabel="step")
    axes[1].set(title="validation perplexity (256-token windows)", xlabel="step", yscale="log")
    axes[2].set(title="mask entries flipped per refresh (%)", xlabel="step", yscale="log")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"{base['model']} {base['method']['sparsity']} from a {args.init} mask, {tokens:,} tokens per row")
    fig.tight_layout()
    fig.savefig(args.out + "_curves.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
