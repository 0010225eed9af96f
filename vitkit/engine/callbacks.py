"""Callbacks of the loop: EMA of the weights, train-metric logging with progress, checkpoint cadence."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from .ema import ModelEma


class EmaCallback:
    """Keeps a :class:`ModelEma` of ``model``, updated after every applied optimizer step."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool):
        self.ema = ModelEma(model, decay, warmup=warmup)

    def on_step_end(self, model: nn.Module) -> None:
        self.ema.update(model)


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

    def on_step_end(self, state, total_steps: int, lr: float, grad_norm: Tensor | None, eta_s: float,
                    shown_total: int | None = None) -> None:
        """``shown_total``: an estimate of the run's length in steps to display instead of ``total_steps``
        (a time budget ends the run before the epoch cap)."""
        if state.step % self.log_every and state.step != total_steps:
            return
        now = time.perf_counter()
        record = {"kind": "train", "step": state.step, "epoch": state.epoch, "lr": lr}
        if self.n:
            # One host sync for the whole window's metrics.
            keys = list(self.sums)
            vals = (torch.stack([self.sums[k] for k in keys]) / self.n).tolist()
            record.update(zip(keys, vals))
        if grad_norm is not None:
            record["grad_norm"] = grad_norm.item()
        record["img_per_s"] = self.samples * self.world_size / max(now - self.t, 1e-9)
        self.logger.log(record)
        self.logger.progress(state.step, shown_total or total_steps, record, eta_s, approx=shown_total is not None)
        self.reset()


class CheckpointCadence:
    """When to checkpoint: every epoch end, every ``every_steps`` steps, and at the end of the run."""

    def __init__(self, every_steps: int | None):
        self.every_steps = every_steps

    def due_mid_epoch(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0
