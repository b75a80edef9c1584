"""Schedules as pure functions of the step (so that resuming needs no schedule state)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate: linear warmup, then cosine decay to `min_ratio`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def linear_ramp(step: int, ramp_steps: int, peak: float) -> float:
    """AST's annealed decay: 0 -> peak linearly over ramp_steps, constant afterwards."""
    if ramp_steps <= 0:
        return peak
    return peak * min(1.0, step / ramp_steps)


def cubic(step: int, total: int, initial: float, final: float, start: int = 0, end_hold: int = 0) -> float:
    """Cubic schedule of Zhu & Gupta / movement pruning: initial before `start`, final in the last
    `end_hold` steps, v = final + (initial - final) (1 - (t - start)/(total - start - end_hold))^3 between."""
    if step < start:
        return initial
    span = max(1, total - start - end_hold)
    progress = min(1.0, (step - start) / span)
    return final + (initial - final) * (1 - progress) ** 3
