"""Logit distillation loss (pure): alpha * T^2 * KL + (1 - alpha) * CE, averaged per token."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            kind: str = "forward") -> torch.Tensor:
    """T^2 * KL per predicted token. forward: KL(p_teacher || p_student); reverse: KL(p_student || p_teacher)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    if kind == "forward":
        kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
    else:
        kl = F.kl_div(t, s, log_target=True, reduction="batchmean")
    return kl * temperature**2
