"""SparseGPT's per-layer OBS loop: slimlm's against a re-implementation of the reference loop (issue 19).

`reference_prune` follows the published algorithm as the reference implementation runs it
(IST-DASLab/sparsegpt `fasterprune`): lazy batch updates over blocks of 128 columns; per column a
clone, a boolean-mask zeroing, the loss and error of the column, an outer-product update of the rest
of the block; for N:M the mask of each group of M columns from w^2 / [H^-1]_jj^2 at the group's
start; one matmul per block for the columns after it. (Unstructured: the reference prunes the
scores <= the k-th smallest of the block; this one prunes exactly the k smallest, as slimlm does, so
that the outputs compare.) Written for this benchmark from the paper's algorithm.

The reference runs with torch's threads as they are (as it would in a process), and again on one
thread, to separate the two gains: slimlm's loop runs its column operations on one thread (on a
busy machine, sharing such small operations is what costs) and does fewer operations per column.

Layers: the real weights of one SmolLM2-135M block (q_proj 576x576, up_proj 1536x576, down_proj
576x1536) with real Hessians from calibration windows of sotu/train.txt. Both run in one process,
alternating, on the same inputs; the median of the repeats is reported, and the largest difference
between the two outputs.

    python benchmarks/sparsegpt_speed.py --data ../shared/data/sotu
"""
import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

from slimlm.ops.sparsity import parse_sparsity
from slimlm.prune.sparsegpt import inverse_hessian_cholesky, sparsegpt_prune


@torch.no_grad()
def reference_prune(weight, hessian, sparsity, blocksize: int = 128, percdamp: float = 0.01):
    """The reference's per-column loop (see the module doc); returns the pruned weight."""
    W = weight.detach().float().clone()
    rows, cols = W.shape
    Hinv = inverse_hessian_cholesky(hessian.float(), W, percdamp)
    prunen, prunem = (sparsity.m - sparsity.n, sparsity.m) if sparsity.is_nm else (0, 0)
    Losses = torch.zeros(rows)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            k = int(tmp.numel() * sparsity.ratio)
            if k:
                mask1.view(-1)[tmp.flatten().topk(k, largest=False).indices] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        Losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W.to(weight.dtype)


def _one_thread_reference(*args):
    """The reference loop with torch on one thread throughout (what slimlm's loop does per block)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference_prune(*args)
    finally:
        torch.set_num_threads(threads)


def real_layers(data: str, windows: int, seqlen: int) -> dict:
    """One SmolLM2-135M block's weights and the Hessians of their inputs over calibration windows."""
    from slimlm import models
    from slimlm.data import calibration_windows, load_tokens

    loaded = models.load("smollm2-135m")
    model = loaded.model.eval()
    block = model.model.layers[len(model.model.layers) // 2]
    names = {"q_proj 576x576": block.self_attn.q_proj, "up_proj 1536x576": block.mlp.up_proj,
             "down_proj 576x1536": block.mlp.down_proj}
    hess, count, hooks = {}, {}, []

    def hook(name):
        def f(module, args, out):
            x = args[0].detach().flatten(0, -2).float()
            hess[name] = hess.get(name, 0) + 2 * x.T @ x
            count[name] = count.get(name, 0) + x.shape[0]
        return f

    for name, module in names.items():
        hooks.append(module.register_forward_hook(hook(name)))
    tokens = load_tokens(loaded.tokenizer, f"{data}/train.txt", split="train")
    with torch.no_grad():
        for window in calibration_windows(tokens, windows, seqlen, 0):
            model(input_ids=window.reshape(1, -1), use_cache=False)
    for h in hooks:
        h.remove()
    return {name: (module.weight.detach().float().clone(), hess[name] / count[name]) for name, module in names.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/sotu")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/sparsegpt_speed.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    layers = real_layers(args.data, args.windows, args.seqlen)
    impls = {"reference": reference_prune, "reference 1 thread": _one_thread_reference, "slimlm": sparsegpt_prune}
    results = {}
    for sp_name in ("2:4", "0.5"):
        sp = parse_sparsity(sp_name)
        for name, (W, H) in layers.items():
            outs = {k: f(W, H, sp) for k, f in impls.items()}  # warm-up, and the outputs compared
            times = {k: [] for k in impls}
            for _ in range(args.repeats):
                for k, f in impls.items():
                    start = time.perf_counter()
                    f(W, H, sp)
                    times[k].append(time.perf_counter() - start)
            med = {k: statistics.median(v) for k, v in times.items()}
            ref = outs["reference"]
            results[f"{name} {sp_name}"] = {
                "median_seconds": med, "all_seconds": times, "speedup": med["reference"] / med["slimlm"],
                "speedup_vs_1_thread_reference": med["reference 1 thread"] / med["slimlm"],
                "max_abs_diff": float((outs["slimlm"] - ref).abs().max()),
                "max_abs_weight": float(W.abs().max()),
                "same_mask": bool(torch.equal(outs["slimlm"] == 0, ref == 0))}
            print(name, sp_name, json.dumps(results[f"{name} {sp_name}"]["median_seconds"]),
                  f"x{results[f'{name} {sp_name}']['speedup']:.2f}", flush=True)
    result = {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores (shared), CPU torch",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "calibration": f"{args.windows} x {args.seqlen}",
              "layers": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
