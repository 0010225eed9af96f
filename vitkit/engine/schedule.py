"""Learning-rate schedules, per optimizer step or on the progress of a wall-clock budget."""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from .budget import Budget, PlateauState
from .config import ScheduleConfig

# Under a time budget the warmup ends after its configured steps, or at this share of the
# budget, whichever comes first: a slow machine must not spend the whole budget warming up.
MAX_WARMUP_PROGRESS = 0.25


def warmup_lr(frac: float, cfg: ScheduleConfig, base_lr: float) -> float:
    """The lr at ``frac`` (0..1) of the warmup: linear, or cosine-shaped for ``onecycle``."""
    if cfg.name.lower() == "onecycle":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    return cfg.warmup_lr + (base_lr - cfg.warmup_lr) * frac


def decay_lr(progress: float, cfg: ScheduleConfig, base_lr: float) -> float:
    """The lr at ``progress`` (0..1) of the post-warmup phase; ``min_lr`` at 1."""
    name = cfg.name.lower()
    if name == "constant":
        return base_lr
    if name in ("cosine", "onecycle"):
        progress = min(1.0, max(0.0, progress))
        return cfg.min_lr + 0.5 * (base_lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {cfg.name!r}: use 'cosine', 'onecycle' or 'constant'")


def lr_at(step: int, cfg: ScheduleConfig, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate after ``step`` optimizer steps (step 0 = the first update).

    Warmup covers steps [0, warmup_steps); decay covers [warmup_steps, total_steps] and reaches
    ``min_lr`` at ``total_steps``.
    """
    if step < warmup_steps:
        return warmup_lr(step / warmup_steps, cfg, base_lr)
    span = max(1, total_steps - warmup_steps)
    return decay_lr((step - warmup_steps) / span, cfg, base_lr)


class LRSchedule:
    """Sets every param group's ``lr = lr * group['lr_scale']``, once per optimizer step.

    Without a budget the lr is :func:`lr_at` of the step count. With a :class:`Budget` it follows
    the run's progress ``p = max(budget.progress(), step / total_steps)``, so it anneals exactly
    when the time (or the step cap, if that comes first) runs out, however the throughput swings:
    warmup for ``warmup_steps`` steps (at most :data:`MAX_WARMUP_PROGRESS` of the budget), then
    decay over the rest of ``p``. The state (step count, the progress at which warmup ended, the
    plateau stop's :class:`~vitkit.engine.budget.PlateauState`) and the budget's elapsed time make a
    resumed run continue the same curve.

    :meth:`reanneal` replaces the rest of the curve by a cool-down to ``min_lr`` (the early stop on a
    plateau, :class:`~vitkit.engine.budget.PlateauStop`).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cfg: ScheduleConfig,
        base_lr: float,
        total_steps: int,
        steps_per_epoch: int,
        budget: Budget | None = None,
    ):
        self.optimizer = optimizer
        self.cfg = cfg
        self.base_lr = base_lr
        self.total_steps = total_steps
        self.budget = budget
        if cfg.warmup_steps is not None:
            warmup = cfg.warmup_steps
        else:
            warmup = round(cfg.warmup_epochs * steps_per_epoch)
        # A warmup longer than the run would never reach the base lr.
        self.warmup_steps = min(warmup, total_steps)
        self.step_count = 0
        self.warmup_end: float | None = None  # budget mode: the progress at which warmup ended
        # The plateau stop's state: its cool-down is part of the lr curve, and it resumes with it.
        self.plateau = PlateauState()
        self._lr = 0.0
        self._apply()

    def progress(self) -> float:
        """Fraction of the run done: budget time or steps, whichever is further along."""
        p = self.step_count / max(1, self.total_steps)
        return max(p, self.budget.progress()) if self.budget is not None else p

    def _budget_lr(self) -> float:
        p = self.progress()
        if self.warmup_end is None:
            frac = max(self.step_count / self.warmup_steps if self.warmup_steps else 1.0, p / MAX_WARMUP_PROGRESS)
            if frac < 1:
                return warmup_lr(frac, self.cfg, self.base_lr)
            self.warmup_end = p
        return decay_lr((p - self.warmup_end) / max(1e-9, 1 - self.warmup_end), self.cfg, self.base_lr)

    def reanneal(self, steps: int) -> None:
        """From the next step on, cool the lr down from its current value to ``min_lr`` over ``steps``
        optimizer steps, along the schedule's own decay (:func:`decay_lr` started from the current lr: the
        cosine of ``cosine`` and ``onecycle``; ``constant`` has none), and under a budget by the budget's
        end at the latest."""
        if steps < 1:
            raise ValueError(f"a re-anneal needs at least one step, got {steps}")
        st = self.plateau
        st.found_step = self.step_count if st.found_step is None else st.found_step
        st.tail_steps, st.tail_lr, st.tail_progress = int(steps), self._lr, self.progress()
        self._apply()

    def _tail_lr(self) -> float:
        st = self.plateau
        frac = (self.step_count - st.found_step) / st.tail_steps
        if self.budget is not None:  # a slowing machine must not end the run before the lr is down
            frac = max(frac, (self.budget.progress() - st.tail_progress) / max(1e-9, 1 - st.tail_progress))
        return decay_lr(frac, self.cfg, st.tail_lr)

    def get_lr(self) -> float:
        """The unscaled lr in use for the current step."""
        return self._lr

    def _apply(self) -> None:
        if self.plateau.found_step is not None and self.plateau.tail_steps:
            lr = self._tail_lr()
        elif self.budget is None:
            lr = lr_at(self.step_count, self.cfg, self.base_lr, self.warmup_steps, self.total_steps)
        else:
            lr = self._budget_lr()
        self._lr = lr
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "warmup_end": self.warmup_end, "plateau": asdict(self.plateau)}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.warmup_end = state.get("warmup_end")
        self.plateau = PlateauState(**state.get("plateau", {}))  # a checkpoint from before the plateau stop: none
        self._apply()
