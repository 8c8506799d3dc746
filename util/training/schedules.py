"""Schedules as small classes whose value at step s is a pure function of s, so an exact resume
only needs the step counter. Each ``apply`` writes the value it returns, so what gets logged is
what was applied."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from util.config import OptimConfig


class LRSchedule:
    """Linear warmup from 0 to ``peak``, then ``constant`` or ``cosine`` decay to ``final``."""

    def __init__(
        self, peak: float, warmup_steps: int, total_steps: int, kind: str = "constant", final: float = 0.0
    ) -> None:
        if kind not in ("constant", "cosine"):
            raise ValueError(f"unknown lr schedule {kind!r}; choose constant or cosine")
        self.peak, self.warmup, self.total, self.kind, self.final = peak, warmup_steps, total_steps, kind, final

    def __call__(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.peak
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.final + (self.peak - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr


class CosineValue:
    """A value moving from ``start`` to ``end`` by a half cosine over ``total_steps``
    (used for weight decay and the EMA momentum, as in I-JEPA). start == end is constant."""

    def __init__(self, start: float, end: float, total_steps: int) -> None:
        self.start, self.end, self.total = start, end, max(1, total_steps)

    def __call__(self, step: int) -> float:
        progress = min(1.0, step / self.total)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WeightDecaySchedule(CosineValue):
    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Sets weight_decay on every group that decays (groups created with weight_decay 0 stay 0)."""
        wd = self(step)
        for group in optimizer.param_groups:
            if group.get("decay", True):
                group["weight_decay"] = wd
        return wd


@dataclass
class Schedules:
    """The three values that move with the step: learning rate, weight decay, EMA momentum."""

    lr: LRSchedule
    weight_decay: WeightDecaySchedule
    ema: CosineValue

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        """Set the lr and weight decay of ``step`` on the optimizer; the values applied, with the EMA momentum."""
        return {
            "lr": self.lr.apply(optimizer, step),
            "weight_decay": self.weight_decay.apply(optimizer, step),
            "ema_momentum": self.ema(step),
        }

    @classmethod
    def build(cls, optim: OptimConfig, lr: float, steps_per_epoch: int, total_steps: int) -> Schedules:
        """The schedules of the ``optim`` section at peak lr ``lr`` (resolved from blr and the global
        batch). ``weight_decay_end`` / ``ema_rate_start`` None: constant weight decay / EMA momentum."""
        wd_end = optim.weight_decay if optim.weight_decay_end is None else optim.weight_decay_end
        ema_start = optim.ema_rate if optim.ema_rate_start is None else optim.ema_rate_start
        return cls(
            lr=LRSchedule(lr, int(optim.warmup_epochs * steps_per_epoch), total_steps, optim.lr_schedule, optim.min_lr),
            weight_decay=WeightDecaySchedule(optim.weight_decay, wd_end, total_steps),
            ema=CosineValue(ema_start, optim.ema_rate, total_steps),
        )
