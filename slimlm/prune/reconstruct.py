"""Block-wise sparse reconstruction: one-shot pruning, then each transformer block *trained* on its cached
calibration inputs to reproduce the dense model's outputs, one block at a time.

For block i (as in `blockwise.py`, only one block's activations are alive beside the streams):
1. targets: the dense block's outputs. `target="dense"` runs the dense block on the dense model's own
   inputs, so block i also learns to undo what the compressed blocks before it got wrong (two streams of
   hidden states are kept); `target="local"` runs it on the compressed inputs (one stream).
2. the block's target layers are pruned one-shot (Wanda or SparseGPT) from statistics of the compressed
   inputs, exactly as `slimlm prune` does;
3. the block's parameters train with AdamW for `steps` steps on mean squared error against the targets,
   `batch` windows per step (gradient accumulation), lr warm-up + cosine as in `train/budget.py`. The
   masks stay fixed (`mask="fixed"`: pruned weights get no gradient) or adapt as AST does
   (`mask="adaptive"`: straight-through gradients, the N:M mask recomputed every Delta-t steps from
   |W|*||x|| with hysteresis, decoupled decay of pruned weights solved for a 50% shrink by the last
   refresh, no refresh in the last Delta-t steps);
4. the masks are baked (exact zeros) and the block's new outputs feed block i + 1. A block whose error on
   the calibration windows came out higher than its one-shot start's (a learning rate too large for it)
   goes back to the one-shot weights: reconstruction never returns a block worse than it found it.

After each block its weights are saved to `checkpoint_dir` (if given); a killed run restarts after the
last finished block, replaying the finished blocks on the calibration windows to rebuild the streams.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import SlimlmError
from ..models import find_blocks
from ..ops import masked
from ..ops.sparsity import Sparsity
from .blockwise import capture_block_inputs, collect_stats, run_block

MASKS = ("fixed", "adaptive")
TARGETS = ("dense", "local")


@dataclass
class Reconstruction:
    steps: int = 64  # optimizer steps per block
    batch: int = 4  # calibration windows per step
    lr: float = 5e-3  # per block: measured on smollm2-135m block 5 (1e-4 .. 1e-2), docs/benchmarks.md
    mask: str = "fixed"  # fixed | adaptive
    target: str = "dense"  # dense: the dense model's activations | local: the dense block on compressed inputs
    bf16: bool = False  # autocast the block's forward and backward

    def check(self, windows: int) -> None:
        if self.steps < 1 or self.batch < 1:
            raise SlimlmError(f"reconstruction needs at least 1 step and 1 window per step (got {self.steps}, {self.batch})")
        if self.batch > windows:
            raise SlimlmError(f"--reconstruct-batch {self.batch} is more than the {windows} calibration windows: "
                              "lower it or raise --nsamples")
        if self.mask not in MASKS or self.target not in TARGETS:
            raise SlimlmError(f"reconstruction mask must be one of {MASKS} and target one of {TARGETS}")


def _schedule(rc: Reconstruction) -> dict:
    """The block's run as a recipe's `train` and `method` sections, so the lr schedule, AST's refresh
    interval and the decay strength come from the same functions as in `slimlm train`."""
    train = {"steps": rc.steps, "lr": rc.lr, "warmup_steps": "auto", "warmup_fraction": 0.05, "min_lr_ratio": 0.1}
    method = {"mask_interval": "auto", "mask_interval_fraction": 0.1, "mask_interval_min": 2,
              "decay": {"mode": "decoupled", "lambda_max": "auto", "target_shrink": 0.5, "ramp_fraction": 0.25}}
    return {"train": train, "method": method}


def _outputs_and_error(block, inputs, targets) -> tuple[list[torch.Tensor], float]:
    """The block's outputs on the windows, and sum ||block(x) - y||^2 / sum ||y||^2 against `targets`."""
    outputs, err, norm = [], 0.0, 0.0
    with torch.no_grad():
        for (h, a, k), y in zip(inputs, targets):
            out = run_block(block, h, a, k)
            err += float((out.float() - y.float()).square().sum())
            norm += float(y.float().square().sum())
            outputs.append(out)
    return outputs, err / max(norm, 1e-30)


def train_block(block: nn.Module, layers: dict[str, nn.Module], inputs: list[tuple], targets: list[torch.Tensor],
                rc: Reconstruction, sparsity: Sparsity, input_norms: dict[str, torch.Tensor],
                seed: int) -> tuple[dict, list[torch.Tensor]]:
    """Train one pruned block towards `targets` (its dense outputs); `inputs`: (hidden, args, kwargs) per
    window. Returns the relative errors before and after and the mask flip rate, and the outputs of the
    block as it is kept (what feeds the next block)."""
    from ..train import budget
    from ..train.optim import AdamW

    plan = _schedule(rc)
    adaptive = rc.mask == "adaptive" and sparsity.is_nm
    start = {k: v.clone() for k, v in block.state_dict().items()}  # the one-shot block, kept if training does worse
    for module in layers.values():
        masked.attach_mask(module, masked.dense_weight(module).detach() != 0, ste=adaptive)
    params = [p for p in block.parameters()]
    trainable = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = AdamW(params, lr=rc.lr, betas=(0.9, 0.95), weight_decay=0.0)
    lam = 0.0
    if adaptive:
        lam_max = budget.lambda_max(plan)
        ramp = budget.ramp_steps(plan["method"]["decay"], rc.steps)
        optimizer.set_decay({masked.dense_weight(m): (lambda m=m: masked.get_mask(m)) for m in layers.values()},
                            lambda: lam, "decoupled")
    before_outputs, before = _outputs_and_error(block, inputs, targets)
    scale = {module: input_norms.get(name) for name, module in layers.items()}
    order = torch.Generator().manual_seed(seed)
    flips = []
    device_type = targets[0].device.type
    for step in range(rc.steps):
        for group in optimizer.param_groups:
            group["lr"] = budget.lr_at(plan["train"], step)
        if adaptive:
            lam = lam_max * min(1.0, (step + 1) / max(ramp, 1))
        picks = torch.randperm(len(inputs), generator=order)[: rc.batch].tolist()
        for j in picks:
            h, a, k = inputs[j]
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=rc.bf16):
                out = run_block(block, h, a, k)
            loss = (out.float() - targets[j].float()).square().mean() / rc.batch
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if adaptive and budget.refreshes_at(plan["method"], rc.steps, step + 1):
            n, m = sparsity.n, sparsity.m
            flips.append(masked.refresh_masks(layers, lambda mod: masked.score_nm_mask(
                mod, n, m, input_scale=scale[mod], margin=0.05)))
    for p, flag in zip(params, trainable):
        p.requires_grad_(flag)
    for module in layers.values():
        masked.bake_mask(module)
    after_outputs, after = _outputs_and_error(block, inputs, targets)
    if after > before:  # a learning rate too large for this block: never publish it worse than one-shot
        block.load_state_dict(start)
    record = {"error_before": before, "error_after": min(after, before), "trained_error": after,
              "kept": "trained" if after <= before else "one-shot",
              "mask_flip_rate": sum(flips) / len(flips) if flips else 0.0}
    return record, (after_outputs if after <= before else before_outputs)


def reconstruct(model: nn.Module, targets: dict[str, nn.Module], prune_layer, hessian: bool, windows: torch.Tensor,
                sparsity: Sparsity, rc: Reconstruction, seed: int = 0, checkpoint_dir: Path | None = None,
                identity: dict | None = None) -> list[dict]:
    """Prune (`prune_layer(name, module, stats)`, as in blockwise.prune_blockwise) and reconstruct every
    block that holds target layers. `identity`: what a resumed run must share with the one that wrote
    `checkpoint_dir` (model, data, seed...). Returns one record per block: errors before/after, seconds."""
    rc.check(len(windows))
    identity = {**(identity or {}), "reconstruction": asdict(rc), "windows": list(windows.shape)}
    prefix, blocks = find_blocks(model)
    outside = [n for n in targets if not n.startswith(prefix + ".")]
    if outside:
        raise SlimlmError(f"layer '{outside[0]}' is outside the transformer blocks ({prefix}): reconstruction "
                          "trains block by block; --ignore it")
    done = _resume(checkpoint_dir, identity)
    sparse, calls = capture_block_inputs(model, blocks, windows)  # hidden states per window; each block's arguments
    dense = list(sparse) if rc.target == "dense" else None
    records = list(done["records"])
    bar = tqdm(list(enumerate(blocks)), desc="reconstructing blocks", unit="block")
    for index, block in bar:
        layers = {n: m for n, m in targets.items() if n.startswith(f"{prefix}.{index}.")}
        start = time.perf_counter()
        runs, calls[index] = calls[index], None  # this block's own arguments (masks, rotary tables), one per window
        inputs = [(h, a, k) for h, (a, k) in zip(sparse, runs)]
        with torch.no_grad():
            goal = [run_block(block, h, a, k) for h, (a, k) in zip(dense if dense is not None else sparse, runs)]
        outputs = None  # the block's outputs on the compressed inputs, when training computed them already
        if index < done["blocks"]:  # finished by an earlier run: its weights, then on to the next block
            if layers:
                block.load_state_dict(load_file(str(checkpoint_dir / f"block-{index}.safetensors")))
        elif layers:
            stats = collect_stats(block, layers, inputs, hessian)
            norms = {n: s.sq_norms.sqrt() for n, s in stats.items()}  # |W|*||x||, the adaptive refresh's score
            with torch.no_grad():
                for name, module in layers.items():
                    prune_layer(name, module, stats.pop(name))
            record, outputs = train_block(block, layers, inputs, goal, rc, sparsity, norms, seed + index)
            records.append({"block": index, **record, "seconds": time.perf_counter() - start})
            bar.set_postfix(error=f"{record['error_before']:.3g}->{record['error_after']:.3g}")
            _save(checkpoint_dir, block, index, identity, records)
        if outputs is None:
            with torch.no_grad():
                outputs = [run_block(block, h, a, k) for h, a, k in inputs]
        sparse = outputs
        dense = goal if dense is not None else None
    return records


def _save(folder: Path | None, block: nn.Module, index: int, identity: dict, records: list[dict]) -> None:
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in block.state_dict().items()}, str(folder / f"block-{index}.safetensors"))
    state = {"blocks": index + 1, "identity": identity, "records": records}
    (folder / "state.tmp.json").write_text(json.dumps(state))
    (folder / "state.tmp.json").replace(folder / "state.json")  # the block file exists before the state names it


def _resume(folder: Path | None, identity: dict) -> dict:
    """What an earlier run of the same job finished (its blocks are reused), or nothing."""
    if folder is None or not (folder / "state.json").is_file():
        return {"blocks": 0, "records": []}
    try:
        state = json.loads((folder / "state.json").read_text())
        differs = sorted(k for k in set(state["identity"]) | set(identity)
                         if state["identity"].get(k) != identity.get(k))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise SlimlmError(f"{folder}/state.json is not a reconstruction state: remove {folder} to start over") from None
    if differs:
        raise SlimlmError(f"{folder} holds a reconstruction of other settings ({', '.join(differs)} differ): "
                          "resume with the same command, or remove the folder to start over")
    return state
