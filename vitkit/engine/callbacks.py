"""Callbacks of the loop: EMA of the weights, train-metric logging with progress, checkpoint cadence.

Like the objective and the user's hooks, each takes ``on_step_end(ctx)`` with a
:class:`~vitkit.engine.protocol.StepContext`.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from .ema import ModelEma
from .protocol import StepContext


class EmaCallback:
    """Keeps a :class:`ModelEma` of ``model``, updated after every applied optimizer step."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool):
        self.ema = ModelEma(model, decay, warmup=warmup)

    def on_step_end(self, ctx: StepContext) -> None:
        if ctx.applied:
            self.ema.update(ctx.trainer.objective.model)


def _eta(tr) -> tuple[float, int | None]:
    """Seconds left, and under a time budget the step count it will reach at the current rate
    (shown instead of ``total_steps``: the budget ends the run before the epoch cap)."""
    st = tr.state
    if tr.budget is None:
        return (tr.total_steps - st.step) * st.train_time_s / max(1, st.step - tr.fit_start_step), None
    eta = tr.budget.remaining()
    return eta, min(tr.total_steps, st.step + round(eta * st.step / max(st.train_time_s, 1e-9)))


class TrainLogger:
    """Averages train metrics over a window of steps; logs them and the progress every ``log_every`` steps."""

    def __init__(self, logger, log_every: int, world_size: int):
        self.logger, self.log_every, self.world_size = logger, log_every, world_size
        self.reset()

    def reset(self) -> None:
        self.t = time.perf_counter()
        self.samples, self.n = 0, 0
        self.sums: dict[str, Tensor] = {}

    def on_micro_batch(self, out: dict[str, Tensor] | None, n_samples: int) -> None:
        """``out`` None: a skipped (non-finite) micro-batch, counted in throughput only."""
        if out is not None:
            for k, v in out.items():
                v = v.detach().float()
                self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.n += 1
        self.samples += n_samples

    def on_step_end(self, ctx: StepContext) -> None:
        state, total_steps = ctx.trainer.state, ctx.total_steps
        if state.step % self.log_every and state.step != total_steps:
            return
        eta, shown = _eta(ctx.trainer)
        now = time.perf_counter()
        record = {"kind": "train", "step": state.step, "epoch": state.epoch, "lr": ctx.lr}
        if self.n:
            # One host sync for the whole window's metrics.
            keys = list(self.sums)
            vals = (torch.stack([self.sums[k] for k in keys]) / self.n).tolist()
            record.update(zip(keys, vals))
        if ctx.grad_norm is not None:
            record["grad_norm"] = ctx.grad_norm.item()
        record["img_per_s"] = self.samples * self.world_size / max(now - self.t, 1e-9)
        self.logger.log(record)
        self.logger.progress(state.step, shown or total_steps, record, eta, approx=shown is not None)
        self.reset()


class CheckpointCadence:
    """When to checkpoint: every epoch end, every ``every_steps`` steps, and at the end of the run."""

    def __init__(self, every_steps: int | None):
        self.every_steps = every_steps

    def due_mid_epoch(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0
