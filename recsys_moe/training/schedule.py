"""The dense optimizer's learning rate over the run.

Warmup keeps the first steps, taken while the gates and towers are still random, from throwing
the experts into a corner (a task stuck at a poor optimum for the whole run); the cosine decay
lets the last epochs settle instead of bouncing around at the full rate, which is also what makes
a later epoch beat an earlier one and early stopping meaningful. (Gradient-norm clipping is the
optimizer's own: `training.optimizer.ClippedAdam`.)

The rate is set by an optimizer step pre-hook, so single-process training and TorchRec's sharded
pipeline (which calls `optimizer.step()` itself) share it. The rate is a pure function of the
global step, so a resumed run continues the same curve with nothing extra in its checkpoint.
The embedding tables keep their fused Adagrad, whose per-row rates already decay by themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from recsys_moe.config import TrainConfig


@dataclass(frozen=True)
class LrSchedule:
    base: float
    total_steps: int
    warmup_steps: int
    min_ratio: float  # the final rate as a share of `base` (cosine)
    kind: str  # constant | cosine

    @classmethod
    def from_config(cls, tc: TrainConfig, steps_per_epoch: int) -> LrSchedule:
        total = max(tc.epochs * steps_per_epoch, 1)
        return cls(tc.lr, total, round(tc.warmup_fraction * total), tc.min_lr_ratio, tc.lr_schedule)

    def lr(self, step: int) -> float:
        """The rate for global step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.base * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.base * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class StepControl:
    """Before every optimizer step: set the scheduled rate."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: LrSchedule) -> None:
        self.optimizer, self.schedule = optimizer, schedule
        self.step = 0
        optimizer.register_step_pre_hook(self._before_step)

    def start(self, step: int) -> None:
        """The global step the next optimizer step is (an epoch's start, a resumed run)."""
        self.step = step

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        lr = self.schedule.lr(self.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.step += 1
