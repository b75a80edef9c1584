"""Run-relative settings: what a recipe's `auto` values become for a run of a given length.

The AST paper tunes its knobs for 40k steps (Delta-t = 10 steps, lambda = 1e-4 in Adam's second moment).
Used unchanged on a run of a few hundred steps, neither of its mechanisms can act: a refresh every 10
steps is a large part of the run, and the decay shrinks pruned weights by about 1%. Here every knob is a
fraction of the run, so that the same recipe behaves alike at 100 steps and at 100k:
- warm-up: `warmup_fraction` of the steps;
- mask refreshes: every `mask_interval_fraction` of the steps (at least `mask_interval_min`), and none
  in the last interval, so that the published mask is one the model was trained with;
- decay strength: the lambda_max for which the decay alone (no gradient) shrinks a pruned weight by
  `target_shrink` by the last refresh, given the run's actual learning-rate schedule.
Pure functions of the recipe: no state, nothing to checkpoint.
"""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import torch

from ..errors import SlimlmError
from .schedules import linear_ramp, warmup_cosine


def warmup_steps(train: dict) -> int:
    """train.warmup_steps, or warmup_fraction of the run when it is 'auto'."""
    if train["warmup_steps"] == "auto":
        return int(round(train["warmup_fraction"] * train["steps"]))
    return train["warmup_steps"]


def lr_at(train: dict, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based), as the engine sets it."""
    return train["lr"] * warmup_cosine(step, train["steps"], warmup_steps(train), train["min_lr_ratio"])


def mask_interval(method: dict, steps: int) -> int:
    """Optimizer steps between two mask refreshes (AST's Delta-t)."""
    if method["mask_interval"] == "auto":
        return max(method["mask_interval_min"], int(round(method["mask_interval_fraction"] * steps)))
    return method["mask_interval"]


def last_refresh(method: dict, steps: int) -> int:
    """The step of the last mask refresh: the last multiple of Delta-t that leaves Delta-t steps of
    training with the mask after it (0: there is none)."""
    every = mask_interval(method, steps)
    return ((steps - every) // every) * every if steps > every else 0


def refreshes_at(method: dict, steps: int, step: int) -> bool:
    """Whether the mask is refreshed after optimizer step `step` (1-based count of steps done)."""
    every = mask_interval(method, steps)
    return step % every == 0 and step <= last_refresh(method, steps)


def ramp_steps(decay: dict, steps: int) -> int:
    return int(decay["ramp_fraction"] * steps)


def decay_rates(train: dict, decay: dict) -> torch.Tensor:
    """lr_t * ramp_t for every step t of the run (float64): lambda_max times this is the per-step rate at
    which decoupled decay shrinks a pruned weight."""
    steps, ramp = train["steps"], ramp_steps(decay, train["steps"])
    return torch.tensor([lr_at(train, t) * linear_ramp(t, ramp, 1.0) for t in range(steps)], dtype=torch.float64)


def decay_integral(rates: torch.Tensor, lambda_max: float, until: int) -> float:
    """sum over steps t < until of lr_t * lambda_t (`rates` from decay_rates): the log-shrink that decoupled
    decay applies to a pruned weight with no gradient (w_T = w_0 * prod(1 - lr_t lambda_t) ~ w_0 exp(-integral))."""
    return lambda_max * float(rates[:until].sum())


def lambda_max(recipe: dict) -> float:
    """method.decay.lambda_max, or for 'auto' the value that shrinks a pruned weight by target_shrink
    (decay alone) over the steps up to the last mask refresh (over the whole run if there is none).
    Solved exactly on the product prod(1 - lr_t lambda_t) by bisection."""
    decay, train = recipe["method"]["decay"], recipe["train"]
    if decay["lambda_max"] != "auto":
        return float(decay["lambda_max"])
    until = last_refresh(recipe["method"], train["steps"]) or train["steps"]
    target = math.log(1.0 - decay["target_shrink"])
    rates = decay_rates(train, decay)[:until]
    # 1 - rate * lambda must stay > 0: the largest lambda allowed makes the biggest step shrink to nothing
    high = 1.0 / float(rates.max()) if until and float(rates.max()) > 0 else 0.0

    def log_kept(lam: float) -> float:
        return float(torch.log1p(-(rates * lam).clamp(max=1 - 1e-16)).sum())

    if high == 0.0 or log_kept(high * (1 - 1e-9)) > target:
        raise SlimlmError(f"method.decay.target_shrink={decay['target_shrink']} cannot be reached in {until} steps "
                          "(the decay ramp has no steps before the last mask refresh): lower "
                          "method.decay.ramp_fraction or set method.decay.lambda_max")
    low = 0.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if log_kept(mid) > target else (low, mid)
    return (low + high) / 2


def check_sparse_schedule(recipe: dict) -> None:
    """Warn about settings of a sparse-training recipe that cannot act in the run they describe (it still runs)."""
    method, steps = recipe["method"], recipe["train"]["steps"]
    if method["mask_update"] == "fixed":
        return
    every = mask_interval(method, steps)
    if every >= steps or not last_refresh(method, steps):
        warnings.warn(f"method.mask_interval={every} leaves no mask refresh in a run of {steps} steps "
                      "(the last Delta-t steps train with a frozen mask): the masks stay as they start; "
                      "lower method.mask_interval or raise train.steps", stacklevel=2)
    decay = method["decay"]
    if decay["mode"] != "none" and decay["ramp_fraction"] > 1.0:
        warnings.warn(f"method.decay.ramp_fraction={decay['ramp_fraction']} is longer than the run: the decay "
                      "never reaches lambda_max", stacklevel=2)


# -- bf16 ------------------------------------------------------------------------------------------
def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (x86 avx512_bf16 / amx_bf16, Arm FEAT_BF16). Without it,
    bf16 autocast is emulated and slower than fp32, so 'auto' leaves it off."""
    if sys.platform.startswith("linux"):
        try:
            return cpuinfo_has_bf16(Path("/proc/cpuinfo").read_text())
        except OSError:
            return False
    if sys.platform == "darwin":
        import subprocess

        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
        return out.stdout.strip() == "1"
    return False


def cpuinfo_has_bf16(cpuinfo: str) -> bool:
    """Whether Linux /proc/cpuinfo text lists a bf16 instruction set (x86 'flags', Arm 'Features')."""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def device_supports_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_bf16()
    return False


def use_bf16(setting, device) -> bool:
    """train.bf16: 'auto' (on where the device computes bf16 natively), true (an error where it does
    not) or false."""
    if setting == "auto":
        return device_supports_bf16(device)
    if setting and not device_supports_bf16(device):
        raise SlimlmError(f"train.bf16=true but device '{device}' has no native bf16 support: set train.bf16=false "
                          "(or auto)")
    return bool(setting)
