"""Per-layer statistics of target layers: shape, sparsity, N:M validity, rank, effective rank."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..ops.factorized import LowRankLinear
from ..models import weight_matrix
from ..ops.sparsity import is_valid_nm, singular_value_stats, sparsity_of


@torch.no_grad()
def layer_stats(targets: dict[str, nn.Module], ranks: bool = True, progress: bool = False) -> list[dict]:
    rows = []
    for name, module in tqdm(targets.items(), desc="inspecting", unit="layer", disable=not progress):
        W = weight_matrix(module).detach()
        row = {"name": name, "shape": list(W.shape), "sparsity": sparsity_of(W),
               "valid_2_4": is_valid_nm(W, 2, 4), "valid_4_8": is_valid_nm(W, 4, 8),
               "stored": stored_weights(module)}
        if ranks:
            row["rank"], row["effective_rank"] = singular_value_stats(W)
        rows.append(row)
    return rows


def stored_weights(module: nn.Module) -> int:
    """Weights a layer really holds: the non-zeros of a (sparse) matrix, or the factors of a low-rank one."""
    if isinstance(module, LowRankLinear):
        return module.down.weight.numel() + module.up.weight.numel()
    return int((weight_matrix(module) != 0).sum())


def totals(model: nn.Module, targets: dict[str, nn.Module]) -> dict:
    target_params = sum(weight_matrix(m).numel() for m in targets.values())
    target_nonzero = sum(stored_weights(m) for m in targets.values())
    all_params = sum(p.numel() for p in model.parameters())
    all_nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return {"target_layers": len(targets), "target_parameters": target_params,
            "target_nonzero": target_nonzero,
            "target_sparsity": 1 - target_nonzero / target_params if target_params else 0.0,
            "model_parameters": all_params, "model_nonzero": all_nonzero}


def format_table(rows: list[dict]) -> str:
    header = f"{'layer':<48} {'shape':>12} {'stored':>9} {'sparsity':>8} {'2:4':>4} {'4:8':>4} {'rank':>5} {'eff90':>5}"
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['name'][-48:]:<48} {shape:>12} {r['stored']:>9,} {r['sparsity']:>8.3f} {'yes' if r['valid_2_4'] else 'no':>4} "
                     f"{'yes' if r['valid_4_8'] else 'no':>4} {r.get('rank', ''):>5} {r.get('effective_rank', ''):>5}")
    return "\n".join(lines)
