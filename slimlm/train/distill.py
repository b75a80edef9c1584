"""Logit distillation from a frozen dense teacher: alpha * T^2 * KL + (1 - alpha) * CE.

For a causal LM the distributions are next-token distributions (per token); for a classifier, the
class distribution (per example). Logit KL only: METHODS.md (AST) found intermediate-layer losses harmful.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .. import models
from ..errors import SlimlmError
from .engine import logits_of, predicted, task_loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            kind: str = "forward") -> torch.Tensor:
    """T^2 * KL per predicted distribution. forward: KL(p_teacher || p_student); reverse: KL(p_student || p_teacher)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    if kind == "forward":
        kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
    else:
        kl = F.kl_div(t, s, log_target=True, reduction="batchmean")
    return kl * temperature**2


def make_teacher(model, d: dict, bf16: bool):
    """The frozen dense teacher: a copy of the starting model (default) or another model with the same
    outputs (vocabulary or classes). Call before the student is changed. `bf16`: whether training runs
    in bf16 autocast; the teacher's dtype 'auto' follows it (a bf16 teacher forward is about 2x faster,
    and its logits feed a bf16-computed loss anyway)."""
    name = d["teacher_dtype"] if d["teacher_dtype"] != "auto" else ("bfloat16" if bf16 else "float32")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    if d["teacher"] is None:
        _refuse_pruned_start(model)
        teacher = copy.deepcopy(model)
    else:
        teacher = models.load(d["teacher"], device=str(next(model.parameters()).device)).model
        t_out, s_out = _outputs(teacher), _outputs(model)
        if t_out != s_out:
            raise SlimlmError(f"teacher '{d['teacher']}' has {t_out} outputs (vocabulary or classes), the student "
                              f"{s_out}: distillation compares their distributions, use a teacher with the "
                              "student's tokenizer (or label set)")
    return teacher.to(dtype).eval().requires_grad_(False)


def _refuse_pruned_start(model, limit: float = 0.25) -> None:
    """The default teacher is a copy of the starting model: a start that is already pruned (a `slimlm
    prune` output, say) would teach its own pruned outputs, KL 0 from step 1. A trained dense model has
    almost no exact zeros, so a quarter of the block weights being zero means it was pruned."""
    weights = [models.weight_matrix(m) for m in models.find_targets(model).values()]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    if zeros >= limit:
        raise SlimlmError(f"the starting model is already pruned ({zeros:.0%} of its block weights are zero): as its "
                          "own teacher it would teach the pruned model (KL 0 from the first step). Start from the "
                          "dense model with a one-shot mask (model=DENSE method.init=wanda), or name the dense "
                          "teacher (method.distill.teacher=DENSE)")


def _outputs(model) -> int:
    head = model.get_output_embeddings()
    return head.out_features if head is not None else model.config.num_labels


def distill_loss(model, teacher, batch: dict, d: dict) -> tuple[torch.Tensor, dict]:
    """The training loss of a distilling method, and its parts to log. Without a teacher: plain CE."""
    logits = logits_of(model, batch)
    ce = task_loss(logits, batch)
    if teacher is None:
        return ce, {"ce": ce.item()}
    with torch.no_grad():
        teacher_logits = logits_of(teacher, batch)
    kl = kd_loss(predicted(logits, batch), predicted(teacher_logits, batch), d["temperature"], d["kl"])
    return d["alpha"] * kl + (1 - d["alpha"]) * ce, {"ce": ce.item(), "kl": kl.item()}
