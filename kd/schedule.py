"""Learning-rate schedule of KD-SCFNet: linear warm-up, then per-iteration cosine decay.

With ``T`` total iterations, ``W`` warm-up iterations, ``lr_start`` the warm-up start, ``lr_peak`` the peak
and ``lr_final`` the end value (KD-SCFNet: 6.4e-4 -> 0.064 over 5 epochs, then cosine back to 6.4e-4)::

    lr(t) = lr_start + (lr_peak - lr_start) * t / W                                   for t < W
    lr(t) = lr_final + (lr_peak - lr_final) * (1 + cos(pi * (t - W) / (T - W))) / 2      for W <= t <= T

``t`` counts optimizer steps from 0; the value at ``t`` is the rate used *by* step ``t``. Parameter groups
keep a fixed multiple of it (the backbone trains at 0.1x), recorded as ``lr_mult`` in each group so the
schedule stays a pure function of the step and a resumed run needs only the step count to continue it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import torch

__all__ = ["WarmupCosine", "with_lr_mult", "set_lr"]


@dataclasses.dataclass(frozen=True)
class WarmupCosine:
    """``schedule(step) -> lr`` (see the module docstring for the formula).

    Attributes:
        total_steps: ``T``, iterations in the whole run (epochs x iterations per epoch), > 0.
        warmup_steps: ``W``, 0 <= W <= T; 0 starts directly with the cosine at ``lr_peak``.
        lr_peak, lr_start, lr_final: the rates at ``t = W``, ``t = 0`` and ``t = T``.
    """

    total_steps: int
    warmup_steps: int
    lr_peak: float = 0.064
    lr_start: float = 6.4e-4
    lr_final: float = 6.4e-4

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must lie in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
        for name in ("lr_peak", "lr_start", "lr_final"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        t, w, total = min(step, self.total_steps), self.warmup_steps, self.total_steps
        if t < w:
            return self.lr_start + (self.lr_peak - self.lr_start) * t / w
        if total == w:
            return self.lr_peak
        progress = (t - w) / (total - w)
        return self.lr_final + (self.lr_peak - self.lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def with_lr_mult(groups: Iterable[dict[str, Any]], base_lr: float) -> list[dict[str, Any]]:
    """Record each group's ``lr / base_lr`` as ``lr_mult`` (what :func:`set_lr` scales by).

    ``models.SODModel.param_groups(lr, backbone_lr_mult)`` returns groups whose ``lr`` already carries the
    multiplier; this keeps the ratio so the schedule can drive every group from one number.
    """
    if base_lr <= 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    out = []
    for g in groups:
        g = dict(g)
        g["lr_mult"] = float(g.get("lr", base_lr)) / base_lr
        out.append(g)
    return out


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate to ``lr * group["lr_mult"]`` (1 for groups without one)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * float(g.get("lr_mult", 1.0))
