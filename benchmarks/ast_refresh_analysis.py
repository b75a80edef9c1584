"""Why does AST's first mask refresh cost so much on smollm2-135m? (issue 3 investigation)

Trains the `ast` recipe for one mask interval (10 steps, same settings as benchmarks/ast_training.py),
then compares the masks before and after the first refresh: validation CE under each, the flips per
layer (magnitudes, drift since the start, input-channel RMS of the weights that came in and went
out), and the CE change caused by the flips of each block and each layer type alone. Also counts how
many 2:4 groups of the starting weights have exactly tied 2nd/3rd magnitudes (the GGUF checkpoint is
4-bit quantized, so weights sit on a 16-level grid per block of 32).

    python benchmarks/ast_refresh_analysis.py --data ../shared/data/sotu [recipe overrides]
"""
import argparse
import json
import tempfile
from pathlib import Path

import torch

from slimlm import data, models, recipe
from slimlm.ops import masked
from slimlm.train.engine import Trainer, causal_lm_loss
from slimlm.methods.ast import SparseTraining


class Snapshot(SparseTraining):
    """The ast hooks, keeping the masks and weights just before the first refresh."""

    def after_step(self, step):
        if step == self.cfg["mask_interval"]:
            self.before = {n: masked.get_mask(m).clone() for n, m in self.targets.items()}
            self.weights = {n: masked.dense_weight(m).detach().clone() for n, m in self.targets.items()}
        return super().after_step(step)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/sotu")
    ap.add_argument("--out", default="benchmarks/results/ast_refresh_analysis.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rec = recipe.resolve("ast", [f"data.train={args.data}/train.txt", f"data.valid={args.data}/valid.txt",
                                 "train.steps=50", "train.eval_every=1000", "train.save_every=1000", *args.overrides])
    loaded = models.load(rec["model"])
    model = loaded.model
    ties = tied_groups(model)
    train = data.load_tokens(loaded.tokenizer, rec["data"]["train"])
    valid = data.load_tokens(loaded.tokenizer, rec["data"]["valid"])
    hooks = Snapshot(rec, loaded.tokenizer)
    trainer = Trainer(model, hooks, rec, train, None, Path(tempfile.mkdtemp()))
    start = {n: masked.dense_weight(m).detach().clone() for n, m in hooks.targets.items()}
    trainer.train(until=rec["method"]["mask_interval"])
    after = {n: masked.get_mask(m).clone() for n, m in hooks.targets.items()}
    ids = valid.ids[: 4 * 256].view(4, 256)

    rms = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: rms.__setitem__(
        n, inp[0].detach().reshape(-1, inp[0].shape[-1]).pow(2).mean(0).sqrt())) for n, m in hooks.targets.items()]
    ce_after = ce(model, ids)
    for h in handles:
        h.remove()

    def use(masks):
        for n, m in hooks.targets.items():
            masked.set_mask(m, masks[n])

    use(hooks.before)
    ce_before = ce(model, ids)
    layers = []
    for n, m in hooks.targets.items():
        old, new = masked.as_out_in(m, hooks.before[n]), masked.as_out_in(m, after[n])
        W, W0 = masked.as_out_in(m, hooks.weights[n]), masked.as_out_in(m, start[n])
        came, went = new & ~old, old & ~new
        a = rms[n].expand_as(W)
        layers.append({"layer": n, "flipped": int(came.sum()), "flip_rate": float((came | went).float().mean()),
                       "came_abs": mean(W.abs(), came), "went_abs": mean(W.abs(), went), "kept_abs": mean(W.abs(), old),
                       "drift": float((W - W0).abs().mean()), "came_input_rms": mean(a, came),
                       "went_input_rms": mean(a, went), "input_rms": float(a.mean())})
    effects = {}
    groups = {}
    for n in hooks.targets:
        groups.setdefault("type " + n.split(".")[-1], []).append(n)
        groups.setdefault("block " + n.split(".")[2], []).append(n)
    for g, names in groups.items():
        use(hooks.before)
        for n in names:
            masked.set_mask(hooks.targets[n], after[n])
        effects[g] = ce(model, ids) - ce_before
    result = {"recipe_overrides": args.overrides, "ce_before_refresh": ce_before, "ce_after_refresh": ce_after,
              "tied_2nd_3rd_groups": ties, "ce_change_by_group": effects, "layers": layers}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"validation CE (4 x 256 tokens) before the refresh {ce_before:.4f}, after {ce_after:.4f}")
    print(f"2:4 groups whose 2nd and 3rd magnitudes tie exactly at the start: {ties:.2%}")
    for g, v in sorted(effects.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  flips of {g:14s} alone: CE {v:+.4f}")


def mean(values, where):
    return float(values[where].mean()) if where.any() else 0.0


@torch.no_grad()
def ce(model, ids):
    return causal_lm_loss(model(input_ids=ids, use_cache=False).logits, ids).item()


@torch.no_grad()
def tied_groups(model):
    tied = total = 0
    for module in models.find_targets(model).values():
        s = models.weight_matrix(module).abs().reshape(-1, 4).sort(dim=1, descending=True).values
        tied += int((s[:, 1] == s[:, 2]).sum())
        total += s.shape[0]
    return tied / total


if __name__ == "__main__":
    main()
