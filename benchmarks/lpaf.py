"""LPAF benchmark: minilm-l6 fine-tuned on the Brown genre task (15 classes), compressed to keep 10%,
20% and 40% of the target-layer parameters by every method at one training budget; plus CPU speed of
the factorized model against dense, the rank-spectrum plot, and one decoder row (smollm2-135m, 50%).

Rows per budget (every method gets `--steps` optimizer steps of `--batch-size` examples, with
distillation from the fine-tuned dense model):
- svd + FT, fisher + FT: factorize the dense weights (plain / Fisher-weighted SVD), fine-tune low-rank
- movement: movement pruning alone (unstructured sparse, same parameter count as the budget)
- lpaf (svd | fisher | sparsity-aware init): movement pruning for half the steps, factorize, mixed-rank
  fine-tuning for the other half; the three share one pruning stage.
Test accuracy on brown/test.jsonl; "init" columns give the accuracy right after factorization.

    python benchmarks/lpaf.py --data ../shared/data/brown
"""
import argparse
import copy
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

from slimlm import data, models, recipe
from slimlm.eval.perplexity import accuracy, perplexity
from slimlm.eval.layers import layer_stats
from slimlm.eval.spectra import energy_curves, plot_spectra
from slimlm.ops.sparsity import layer_mask
from slimlm.train import job
from slimlm.train.distill import make_teacher


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/brown")
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--budgets", default="0.1,0.2,0.4")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--runs", default="runs/bench-lpaf")
    ap.add_argument("--out", default="benchmarks/results/lpaf")
    ap.add_argument("--decoder-data", default="../shared/data/sotu")
    ap.add_argument("--decoder-steps", type=int, default=0, help="steps of the smollm2-135m row (0: skip it)")
    ap.add_argument("--decoder-svd-iters", type=int, default=20, help="EM rounds of the decoder's sparsity-aware SVD")
    ap.add_argument("--decoder-only", action="store_true", help="run only the decoder row, into OUT_decoder.json")
    args = ap.parse_args()
    if args.decoder_only:
        results = {"meta": {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"}}
        decoder_row(results, args)
        json.dump(results, open(args.out + "_decoder.json", "w"), indent=2)
        return
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    d = args.data
    common = [f"data.train={d}/train.jsonl", f"data.max_length={args.max_length}", f"train.batch_size={args.batch_size}"]
    results = {"meta": {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
                        "torch": torch.__version__, "model": args.model, "steps": args.steps, "batch_size": args.batch_size,
                        "max_length": args.max_length, "teacher_steps": args.teacher_steps}, "rows": []}

    # 1. the dense teacher
    teacher_dir = runs / "teacher"
    if not (teacher_dir / "report.json").exists():
        job.run(recipe.resolve("finetune", common + [f"model={args.model}", f"train.steps={args.teacher_steps}",
                                                     "train.eval_every=100000", "train.save_every=100000"]),
                str(teacher_dir), overwrite=True)
    dense = models.load(str(teacher_dir))
    names = [dense.model.config.id2label[i] for i in range(dense.model.config.num_labels)]
    test = data.load_labeled(dense.tokenizer, f"{d}/test.jsonl", args.max_length, names)
    dense_acc = accuracy(dense.model, test)["accuracy"]
    add_row(results, args, "dense", 1.0, dense_acc, None, 0)

    def spec(name, keep, *extra):
        return recipe.resolve(name, common + [f"model={teacher_dir}", f"method.keep={keep}", f"train.steps={args.steps}",
                                              "train.eval_every=100000", "train.save_every=100000", *extra])

    spectra_models = {"dense": models.find_targets(dense.model)}
    dense_params = {n: p.numel() for n, p in dense.model.named_parameters()}
    budgets = [float(b) for b in args.budgets.split(",")]
    for keep in budgets:
        # movement pruning alone (unstructured sparse at the budget), through `slimlm train`
        out = runs / f"movement-{keep}"
        start = time.perf_counter()
        rep = job.run(spec("movement", keep), str(out), overwrite=True)
        sparse = models.load(str(out)).model
        add_row(results, args, "movement (sparse)", keep, accuracy(sparse, test)["accuracy"], None,
                time.perf_counter() - start, rep["parameters"]["target_fraction"])
        if keep == min(budgets):
            spectra_models[f"movement {keep:.0%}"] = models.find_targets(sparse)
            spectra_models[f"magnitude {keep:.0%}"] = magnitude_pruned(dense.model, keep)
        # low-rank rows share the library's LPAF stages: baselines factorize the dense weights and
        # fine-tune the factors for all steps; LPAF prunes for half the steps (one pruning stage
        # shared by its three initialisations), factorizes, then mixed-rank fine-tunes
        held = ("sparsity-aware", "method.lpaf.pruned_weight=0.1")  # the variant that pins pruned entries
        for prune, inits in (("none", (("svd",), ("fisher",))),
                             ("movement", (("svd",), ("fisher",), ("sparsity-aware",), held))):
            rec = spec("lpaf", keep, f"method.lpaf.prune={prune}")
            loaded = models.load(str(teacher_dir))
            train = data.load_labeled(loaded.tokenizer, rec["data"]["train"], args.max_length, names)
            teacher = make_teacher(loaded.model, rec["method"]["distill"])
            start = time.perf_counter()
            _, loaded.model, targets = job.lpaf_prune_stage(loaded.model, rec, teacher, train, None, runs / f"lpaf-{keep}-{prune}")
            prune_seconds = time.perf_counter() - start
            for init, *extra in inits:
                model = copy.deepcopy(loaded.model)
                r = spec("lpaf", keep, f"method.lpaf.prune={prune}", f"method.lpaf.factorization={init}", *extra,
                         *(["method.lpaf.mixed=none"] if prune == "none" else []))
                start = time.perf_counter()
                mine = {n: model.get_submodule(n) for n in targets}
                layers = job.lpaf_factorize(model, r, mine, train)
                for layer in layers.values():
                    layer.use_lowrank = True
                init_acc = accuracy(model, test)["accuracy"]
                _, hooks = job.lpaf_finetune(model, r, teacher, layers, train, None,
                                             runs / f"lpaf-{keep}-{prune}-{init}{'-held' if extra else ''}")
                hooks.export(model)
                label = f"{init} + FT" if prune == "none" else f"lpaf ({init} init{', pruned entries weighted 0.1' if extra else ''})"
                fraction = job.parameter_counts(model, dense_params, list(layers))["target_fraction"]
                add_row(results, args, label, keep, accuracy(model, test)["accuracy"], init_acc,
                        prune_seconds + time.perf_counter() - start, fraction)
        results.setdefault("speed", {})[str(keep)] = speed_ratio(dense.model, model, args.batch_size, args.max_length)
        print(results["speed"][str(keep)], flush=True)
        write(results, args)

    plot_spectra({k: energy_curves(v) for k, v in spectra_models.items()}, args.out + "_spectra.png",
                 title=f"{args.model} on Brown: cumulative singular-value energy (dotted: 90%)")
    results["effective_rank"] = {k: effective_ranks(v) for k, v in spectra_models.items()}
    if args.decoder_steps:
        decoder_row(results, args)
    write(results, args)


def magnitude_pruned(model, keep):
    """The dense classifier with each target matrix magnitude-pruned to `keep` (no training)."""
    pruned = copy.deepcopy(model)
    targets = models.find_targets(pruned)
    with torch.no_grad():
        for module in targets.values():
            module.weight.mul_(layer_mask(module.weight.abs(), 1 - keep))
    return targets


def effective_ranks(targets):
    rows = layer_stats(targets, ranks=True)
    return {"mean_effective_rank_fraction": sum(r["effective_rank"] / min(r["shape"]) for r in rows) / len(rows),
            "mean_rank_fraction": sum(r["rank"] / min(r["shape"]) for r in rows) / len(rows)}


@torch.no_grad()
def speed_ratio(dense, lowrank, batch_size, length, rounds=7):
    """CPU forward time of one batch, dense vs factorized, measured alternately in the same run
    (the machine is shared: the best of several alternating rounds, not absolute times)."""
    ids = torch.randint(0, dense.config.vocab_size, (batch_size, length))
    times = {"dense": [], "lowrank": []}
    for model in (dense, lowrank):
        model.eval()(input_ids=ids)  # warm-up
    for _ in range(rounds):
        for key, model in (("dense", dense), ("lowrank", lowrank)):
            start = time.perf_counter()
            model(input_ids=ids)
            times[key].append(time.perf_counter() - start)
    return {"dense_s": min(times["dense"]), "lowrank_s": min(times["lowrank"]),
            "speedup": min(times["dense"]) / min(times["lowrank"]), "batch_size": batch_size, "length": length}


def add_row(results, args, method, keep, acc, init_acc, seconds, target_fraction=None):
    row = {"method": method, "keep": keep, "test_accuracy": acc, "init_accuracy": init_acc, "train_seconds": seconds,
           "target_fraction": target_fraction}
    results["rows"].append(row)
    print(row, flush=True)


def decoder_row(results, args):
    """smollm2-135m at a 50% budget with LPAF on State of the Union text, perplexity on its test split."""
    dd = args.decoder_data
    out = Path(args.runs) / "smollm2-lpaf-0.5"
    rec = recipe.resolve("lpaf", [f"data.train={dd}/train.txt", f"data.valid={dd}/valid.txt", "method.keep=0.5",
                                  f"train.steps={args.decoder_steps}", "train.batch_size=4", "train.lr=2e-4",
                                  "train.warmup_steps=2", "train.eval_every=100000", "train.save_every=100000",
                                  "data.seqlen=256", "method.distill.alpha=0.67",
                                  f"method.lpaf.svd_iters={args.decoder_svd_iters}"])
    start = time.perf_counter()
    job.run(rec, str(out), overwrite=True)
    loaded = models.load(str(out))
    test = data.load_tokens(loaded.tokenizer, f"{dd}/test.txt")
    ppl = perplexity(loaded.model, test, 1024)["perplexity"]
    results["decoder"] = {"model": "smollm2-135m", "keep": 0.5, "steps": args.decoder_steps, "tokens": args.decoder_steps * 4 * 256,
                          "test_ppl_1024": ppl, "seconds": time.perf_counter() - start}
    print(results["decoder"], flush=True)


def write(results, args):
    json.dump(results, open(args.out + ".json", "w"), indent=2)
    lines = ["| method | budget | target params kept | accuracy after factorization | test accuracy |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in results["rows"]:
        kept = f"{r['target_fraction']:.1%}" if r.get("target_fraction") else "-"
        init = f"{r['init_accuracy']:.4f}" if r.get("init_accuracy") is not None else "-"
        lines.append(f"| {r['method']} | {r['keep']:.0%} | {kept} | {init} | {r['test_accuracy']:.4f} |")
    if results.get("speed"):
        lines += ["", "| budget | dense batch (s) | factorized batch (s) | CPU speed-up |", "| ---: | ---: | ---: | ---: |"]
        for keep, v in results["speed"].items():
            lines.append(f"| {float(keep):.0%} | {v['dense_s']:.3f} | {v['lowrank_s']:.3f} | {v['speedup']:.2f}× |")
    open(args.out + ".md", "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
