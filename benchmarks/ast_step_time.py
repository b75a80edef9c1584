"""Step time of AST against a dense step with the same distillation, in fp32 and bf16, in one run (issue 12).

Four trainers live side by side (dense+KD and AST, each in fp32 and in bf16 autocast with a bf16
teacher); their steps alternate, so that a noisy shared machine slows them alike, and the median of
the repeats is reported. The AST step includes the decay term in the optimizer; a mask refresh (the
activation-aware score of a Wanda start over every target layer) is timed on its own and amortized
over the refresh interval of a run of --run-steps steps.

    python benchmarks/ast_step_time.py --data ../shared/data/sotu
"""
import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slimlm import data, models, recipe
from slimlm.train import budget
from slimlm.train.distill import distill_loss, make_teacher
from slimlm.train.engine import Hooks, Trainer
from slimlm.methods.ast import SparseTraining


class DenseKD(Hooks):
    """Dense training with the same distillation loss: the reference step."""

    def __init__(self, recipe):
        self.distill = recipe["method"]["distill"]

    def setup(self, trainer):
        self.teacher = make_teacher(trainer.model, self.distill, trainer.bf16)

    def loss(self, model, batch):
        return distill_loss(model, self.teacher, batch, self.distill)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/sotu")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--run-steps", type=int, default=245, help="run length whose refresh interval amortizes a refresh")
    ap.add_argument("--out", default="benchmarks/results/ast_step_time.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    common = [f"data.train={args.data}/valid.txt", "method.init=wanda", "method.nsamples=8",
              f"train.steps={args.repeats + 2}", *args.overrides]
    trainers = {}
    for precision in ("fp32", "bf16"):
        for kind in ("dense+kd", "ast"):
            rec = recipe.resolve("ast", common + [f"train.bf16={'true' if precision == 'bf16' else 'false'}"])
            loaded = models.load(rec["model"], device=rec["train"]["device"])
            stream = data.load_tokens(loaded.tokenizer, rec["data"]["train"])
            hooks = SparseTraining(rec, loaded.tokenizer) if kind == "ast" else DenseKD(rec)
            trainer = Trainer(loaded.model, hooks, rec, stream, None, Path(tempfile.mkdtemp()))
            trainer.train(until=1)  # warm-up step
            trainers[(kind, precision)] = trainer
    seconds = {key: [] for key in trainers}
    for rep in range(args.repeats):
        for key, trainer in trainers.items():
            history = trainer.train(until=trainer.step + 1)
            seconds[key].append(history[-1]["step_seconds"])
    ast_hooks = trainers[("ast", "bf16")].hooks
    start = time.perf_counter()
    ast_hooks.refresh()
    refresh = time.perf_counter() - start
    every = budget.mask_interval(ast_hooks.cfg, args.run_steps)
    med = {f"{k} {p}": statistics.median(v) for (k, p), v in seconds.items()}
    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores", "torch": torch.__version__,
        "tokens_per_step": trainers[("ast", "bf16")].cfg["batch_size"] * trainers[("ast", "bf16")].seqlen,
        "median_step_seconds": med, "all_step_seconds": {f"{k} {p}": v for (k, p), v in seconds.items()},
        "refresh_seconds": refresh, "refresh_interval": every,
        "ast_to_dense_kd_bf16": (med["ast bf16"] + refresh / every) / med["dense+kd bf16"],
        "ast_to_dense_kd_fp32": (med["ast fp32"] + refresh / every) / med["dense+kd fp32"],
        "bf16_speedup_ast": med["ast fp32"] / med["ast bf16"],
        "bf16_speedup_dense_kd": med["dense+kd fp32"] / med["dense+kd bf16"],
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
