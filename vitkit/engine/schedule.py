"""Per-optimizer-step learning-rate schedules."""

from __future__ import annotations

import math

import torch

from .config import ScheduleConfig


def lr_at(step: int, cfg: ScheduleConfig, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate after ``step`` optimizer steps (step 0 = the first update).

    Warmup covers steps [0, warmup_steps); decay covers [warmup_steps, total_steps] and reaches
    ``min_lr`` at ``total_steps``.
    """
    name = cfg.name.lower()
    if step < warmup_steps:
        frac = step / warmup_steps
        if name == "onecycle":
            frac = 0.5 * (1 - math.cos(math.pi * frac))
        return cfg.warmup_lr + (base_lr - cfg.warmup_lr) * frac
    if name == "constant":
        return base_lr
    if name in ("cosine", "onecycle"):
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return cfg.min_lr + 0.5 * (base_lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {cfg.name!r}: use 'cosine', 'onecycle' or 'constant'")


class LRSchedule:
    """Sets every param group's ``lr = lr_at(step) * group['lr_scale']``.

    Stepped once per optimizer step, like ``torch.optim.lr_scheduler.LambdaLR``; its state is
    the step count, so resuming restores the exact lr.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cfg: ScheduleConfig,
        base_lr: float,
        total_steps: int,
        steps_per_epoch: int,
    ):
        self.optimizer = optimizer
        self.cfg = cfg
        self.base_lr = base_lr
        self.total_steps = total_steps
        if cfg.warmup_steps is not None:
            warmup = cfg.warmup_steps
        else:
            warmup = round(cfg.warmup_epochs * steps_per_epoch)
        # A warmup longer than the run would never reach the base lr.
        self.warmup_steps = min(warmup, total_steps)
        self.step_count = 0
        self._apply()

    def get_lr(self) -> float:
        """The unscaled lr for the current step."""
        return lr_at(self.step_count, self.cfg, self.base_lr, self.warmup_steps, self.total_steps)

    def _apply(self) -> None:
        lr = self.get_lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
