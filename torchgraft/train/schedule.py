"""Learning-rate schedules: linear warmup, then constant / cosine / linear / warmup-stable-decay.

A schedule is a pure function of the step (`factor(step)` in [0, 1] times each group's peak lr),
so its whole state is the step number: nothing extra to save for an exact resume.
"""
from __future__ import annotations

import math

import torch

from torchgraft.train.config import ScheduleConfig


class LRSchedule:
    def __init__(self, cfg: ScheduleConfig, max_steps: int):
        self.cfg, self.max_steps = cfg, max_steps

    def factor(self, step: int) -> float:
        """Multiplier of the peak lr for optimizer update number `step` (0-based)."""
        c, total = self.cfg, self.max_steps
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.name == "constant":
            return 1.0
        lo = c.min_lr_ratio
        if c.name == "wsd":
            decay_steps = max(1, round(total * c.decay_fraction))
            start = max(c.warmup_steps, total - decay_steps)
            if step < start:
                return 1.0
            progress = min(1.0, (step - start) / max(1, total - start))
            return 1.0 - (1.0 - lo) * progress
        progress = min(1.0, (step - c.warmup_steps) / max(1, total - c.warmup_steps))
        if c.name == "linear":
            return 1.0 - (1.0 - lo) * progress
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr for update `step`; returns the first group's lr."""
        f = self.factor(step)
        for g in optimizer.param_groups:
            if isinstance(g["lr"], torch.Tensor):  # torchao's low-bit optimizers keep lr as a tensor
                g["lr"].fill_(g["peak_lr"] * f)
            else:
                g["lr"] = g["peak_lr"] * f
        return float(optimizer.param_groups[0]["lr"])
