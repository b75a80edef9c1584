"""How informative are the movement scores of a short pruning stage? (issue 4 investigation)

Reads an LPAF pruning-stage checkpoint (weights, masks, accumulated scores) and the dense teacher, and
reports per target matrix: the overlap of the movement mask with the magnitude mask of the same size
(a random mask overlaps by the kept fraction itself), the share of the dense weights' energy sum w^2
each mask keeps, and the rank correlation of scores with |w|.

    python benchmarks/movement_scores.py runs/bench-lpaf/lpaf-0.1-movement/prune/checkpoint-50 runs/bench-lpaf/teacher
"""
import argparse
import json

import torch
from safetensors.torch import load_file

from slimlm import models
from slimlm.ops.sparsity import layer_mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("dense")
    ap.add_argument("--json")
    args = ap.parse_args()
    state = load_file(f"{args.checkpoint}/model.safetensors")
    dense = models.load(args.dense).model
    rows = []
    for name, module in models.find_targets(dense).items():
        W = module.weight.detach()
        scores = state[f"{name}.parametrizations.weight.0.scores"]
        mask = state[f"{name}.parametrizations.weight.0.mask"]
        keep = mask.float().mean().item()
        magnitude = layer_mask(W.abs(), 1 - keep)
        energy = (W**2).sum()
        rank = lambda t: t.flatten().argsort().argsort().double()  # noqa: E731
        r_s, r_w = rank(scores), rank(W.abs())
        corr = float(((r_s - r_s.mean()) * (r_w - r_w.mean())).mean() / (r_s.std() * r_w.std()))
        rows.append({"layer": name, "keep": keep, "overlap_with_magnitude": float((mask & magnitude).sum() / mask.sum()),
                     "energy_kept_movement": float((W**2)[mask].sum() / energy),
                     "energy_kept_magnitude": float((W**2)[magnitude].sum() / energy), "spearman_scores_abs_w": corr})
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "layer"}
    print(json.dumps(mean, indent=1))
    if args.json:
        json.dump({"checkpoint": args.checkpoint, "mean": mean, "layers": rows}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
