"""The one training loop: every objective (supervised, distillation, self-supervised) runs here."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from torch import Tensor, nn

from . import checkpoint as ckpt
from .budget import Budget, loader_samples
from .callbacks import CheckpointCadence, TrainLogger
from .config import EngineConfig, OptimConfig, ScheduleConfig
from .distributed import agree_on_failure, barrier, no_sync
from .evaluation import end_on_best, evaluate_with_ema, log_val, record_best, run_evaluation
from .failures import AgreedFailure, NonFiniteLossError, agree_if_distributed
from .feed import epoch_iterator, sampler_position
from .logging import write_summary
from .optim import optimizer_step
from .plots import write_plots
from .protocol import StepContext
from .runtime import autocast, batch_size, prefetch, prepare_batch
from .setup import restore, setup_training
from .state import TrainState
from .summary import build_summary

__all__ = ["NonFiniteLossError", "Trainer"]


class Trainer:
    """Trains an :class:`~vitkit.engine.protocol.Objective`: amp, accumulation, clipping, schedule, EMA,
    checkpoints with exact resume, DDP/FSDP, logs.

    The loop lives here; the pieces it uses each live in their own file: setup (device,
    wrapping, optimizer, schedule, EMA, checkpointer) in :mod:`~vitkit.engine.setup`, counters in
    :class:`~vitkit.engine.state.TrainState` (``trainer.state``), checkpoint contents in
    :class:`~vitkit.engine.checkpointer.Checkpointer`, evaluation in
    :func:`~vitkit.engine.evaluation.run_evaluation` with the objective's evaluator, EMA,
    logging and checkpoint cadence in :mod:`~vitkit.engine.callbacks`, the summary in
    :mod:`~vitkit.engine.summary`.

    Args:
        objective: owns the model (``objective.model``) and any extra state.
        train_loader: iterable with ``len()`` yielding batches (dicts of tensors / lists of tensors).
        val_loader: optional; ``objective.evaluator()`` runs over it.
        cfg, optim_cfg, sched_cfg: see :mod:`vitkit.engine.config`.
        out_dir: run directory (defaults to ``cfg.out_dir``).
        train_transform, eval_transform: ``batch -> batch`` callables applied on the device
            (batched augmentation, normalisation, mixup).
        sampler: the train sampler, for exact mid-epoch resume: it must have ``set_epoch(e)`` and
            ``load_state_dict({"epoch", "position"})`` (position = samples of this process already
            consumed in the epoch). Defaults to ``train_loader.sampler`` when that has them.
            Without one, a mid-epoch resume skips the consumed batches instead, and a loader
            with ``set_epoch`` (streaming shards) is told each epoch.
        hooks: objects with optional ``on_step_end(ctx)`` (a :class:`~vitkit.engine.protocol.StepContext`,
            as the objective gets: ``ctx.trainer``, ``ctx.step``, ``ctx.lr``, ``ctx.metrics`` ...)
            and ``on_epoch_end(trainer, epoch, val)``. Setting ``trainer.should_stop = True`` ends
            the run cleanly after the current step.
        config_to_save: the run's full config (primitives), stored in each checkpoint.
        budget: the run's clock when ``cfg.time_budget`` is set (``vitkit.train`` starts it before
            the data scan); by default one starts here.
    """

    def __init__(
        self,
        objective: nn.Module,
        train_loader: Iterable,
        val_loader: Iterable | None = None,
        cfg: EngineConfig | None = None,
        optim_cfg: OptimConfig | None = None,
        sched_cfg: ScheduleConfig | None = None,
        out_dir: str | os.PathLike | None = None,
        train_transform=None,
        eval_transform=None,
        sampler=None,
        hooks: Sequence = (),
        config_to_save: dict | None = None,
        budget: Budget | None = None,
    ):
        self.cfg = cfg = cfg if cfg is not None else EngineConfig()
        self.optim_cfg = optim_cfg if optim_cfg is not None else OptimConfig()
        self.sched_cfg = sched_cfg if sched_cfg is not None else ScheduleConfig()
        self.out_dir = Path(out_dir if out_dir is not None else cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.train_loader, self.val_loader = train_loader, val_loader
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.hooks = list(hooks)
        self.config_to_save = config_to_save or {}
        self.objective = objective
        self.objective_name = getattr(objective, "registered_name", None) or type(objective).__name__
        setup = setup_training(objective, train_loader, cfg, self.optim_cfg, self.sched_cfg, self.out_dir,
                               self.ckpt_dir, sampler=sampler, budget=budget)
        for name, value in setup.items():
            setattr(self, name, value)
        self.is_main = self.dist.is_main
        self.state = TrainState()
        self.cadence = CheckpointCadence(cfg.ckpt_every_steps)
        self.train_log = TrainLogger(self.logger, cfg.log_every, self.dist.world_size)
        self.should_stop = False
        # Fields the caller adds to summary.json (called once, when the engine writes it).
        self.summary_extra: Callable[[], dict] | None = None
        self.last_val: dict[str, float] = {}
        self.resume_sampler_state: dict | None = None
        self.last_evaluator = None
        self._last_saved_step = -1
        self._last_eval_step = -1
        self.fit_start_step = 0
        self._t_fit = 0.0
        self._rng_at_step: tuple | None = None

    # ------------------------------------------------------------------ counters (in self.state)

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.state.epoch = value

    @property
    def epoch_step(self) -> int:
        return self.state.epoch_step

    @property
    def ema(self):
        """The :class:`~vitkit.engine.ema.ModelEma` when ``engine.ema_decay`` is set, else None."""
        return self.ema_callback.ema if self.ema_callback is not None else None

    def _prepare(self, batch, transform):
        return prepare_batch(batch, self.device, transform, self.cfg.channels_last)

    # ------------------------------------------------------------------ checkpoints

    def sampler_state(self) -> dict:
        """The train sampler's position, from the steps taken (what ``trainer_state.pt`` stores)."""
        return sampler_position(self.sampler, self.state, self.cfg.accum_steps, self.batch_size)

    def save_checkpoint(self, is_best: bool = False, rng: dict | None = None) -> Path | None:
        """Write a checkpoint of the current step (main process); all processes must call it.

        A failure on the main process (non-finite weights) reaches every process.
        """
        self.tally.read(self.state, self.logger.info)  # a pending non-finite loss stops the run before this
        path, error = None, None
        try:
            path = self.checkpointer.save(self, is_best=is_best, rng=rng)
        except Exception as e:
            error = e
        agree_on_failure(error)
        self._last_saved_step = self.step
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore objective, EMA, optimizer, schedule, scaler, counters and RNG from ``path``."""
        loaded = self.checkpointer.load(self, path)
        self._last_saved_step = self.step
        self.logger.info(f"resumed from {loaded} at step {self.step} (epoch {self.epoch})")

    def _save_after_failure(self) -> None:
        """Checkpoint the last completed step after an error every process agreed on."""
        if self._last_saved_step == self.step or self.step == 0 or self._rng_at_step is None:
            return
        self.optimizer.zero_grad(set_to_none=True)  # a half-accumulated step is dropped
        try:
            path = self.save_checkpoint(rng=ckpt.rng_state_to_dict(self._rng_at_step))
        except Exception as e:  # the original error matters more; say why nothing was saved
            self.logger.info(f"no checkpoint written after the failure: {e}")
            return
        self.logger.info(f"saved {path or 'a checkpoint'} of step {self.step} before stopping")

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, use_ema: bool = False) -> dict[str, float]:
        """Run the objective's evaluator over the validation set (reduced across processes).

        With ``use_ema`` the evaluator sees the EMA copy of the model instead of ``objective.model``.
        """
        if self.val_loader is None:
            return {}
        model = self.objective.model
        if use_ema:
            if self.ema is None:
                raise ValueError("evaluate(use_ema=True) needs engine.ema_decay set")
            model = self.ema.module

        evaluator = self.objective.evaluator()
        if not use_ema:
            self.last_evaluator = evaluator

        def count_skipped(batch):
            if not use_ema and "skipped" in batch:
                self.state.skipped_files += int(batch["skipped"].sum())

        return run_evaluation(
            self.objective, model, evaluator, self.val_loader,
            lambda b: self._prepare(b, self.eval_transform), lambda: autocast(self.amp_dtype, self.device), count_skipped,
        )

    def _run_eval(self) -> dict[str, float]:
        t_eval = time.perf_counter()
        val = evaluate_with_ema(self)
        if self.budget is not None:  # a measured eval sizes the reserve for the final one
            self.budget.note_eval(time.perf_counter() - t_eval)
        self._last_eval_step = self.step
        self.last_val = val
        if not val:
            return val
        improved = record_best(self.state, val, self.last_evaluator)
        val["_improved"] = improved
        log_val(self.logger, self.step, self.epoch, val)
        return val

    # ------------------------------------------------------------------ training

    def _next_batch(self, it):
        """The next prepared batch, or None at the loader's end; data errors are agreed on."""
        batch, error = None, None
        try:
            batch = next(it, None)
            if batch is not None:
                batch = self._prepare(batch, self.train_transform)
        except Exception as e:
            error = e
        agree_if_distributed(error)
        return batch

    def _on_step_end(self, lr: float, grad_norm: Tensor | None, applied: bool, out: dict) -> None:
        ctx = StepContext(self.state.step, self.total_steps, self.optimizer, self, lr=lr, grad_norm=grad_norm,
                          metrics={k: v.detach() for k, v in out.items()}, applied=applied)
        if applied:
            if self.ema_callback is not None:
                self.ema_callback.on_step_end(ctx)
            self.objective.on_step_end(ctx)
        self._rng_at_step = ckpt.capture_rng_state()
        for h in self.hooks:
            if hasattr(h, "on_step_end"):
                h.on_step_end(ctx)
        st = self.state
        if self.budget is not None:  # size the end reserve from the measured train rate
            self.budget.on_step(st.step, st.train_samples, st.train_time_s, loader_samples(self.val_loader))
        self.train_log.on_step_end(ctx)

    def _train_epoch(self) -> str | None:
        """Run the rest of the current epoch; returns a stop reason, or None at the epoch's end.

        On CUDA no step waits for the device: the next batch is copied ahead, and losses, metrics
        and counts stay on the device until a log step or a checkpoint reads them."""
        cfg, st = self.cfg, self.state
        accum = cfg.accum_steps
        it = prefetch(epoch_iterator(self.train_loader, self.sampler, st, accum, self.batch_size,
                                     self.resume_sampler_state), self.device)
        self.resume_sampler_state = None
        self.train_log.reset()
        micro, bad, out = 0, False, {}
        t_step = time.perf_counter()
        while (batch := self._next_batch(it)) is not None:
            if "skipped" in batch:
                self.tally.add_files(batch["skipped"], st)
            n = batch_size(batch)
            if hasattr(self.sampler, "advance"):
                self.sampler.advance(n)
            micro += 1
            last_micro = micro == accum
            loss, error = None, None
            try:
                with no_sync(self.module, self.dist.enabled and not last_micro), autocast(self.amp_dtype, self.device):
                    out = self.train_fn(batch)
                loss = out["loss"]
            except Exception as e:
                error = e
            bad = self.tally.loss_is_bad(loss, error, st.step + 1, self.dist.world_size) or bad
            if not bad:
                self.scaler.scale(loss / accum).backward()
            self.train_log.on_micro_batch(None if bad else out, n)
            st.train_samples += n * self.dist.world_size
            if not last_micro:
                continue

            micro = 0
            lr = self.scheduler.get_lr()
            grad_norm = None
            if bad:
                self.optimizer.zero_grad(set_to_none=True)
                st.nonfinite_skipped += 1
                self.logger.info(f"step {st.step + 1}: non-finite loss, step skipped ({st.nonfinite_skipped})")
            else:
                grad_norm = optimizer_step(self.optimizer, self.scaler, self.params, self.optim_cfg.clip_grad,
                                           self.optim_cfg.clip_mode, found_inf=self.tally.step_flag())
            st.step += 1
            st.epoch_step += 1
            self.scheduler.step()
            now = time.perf_counter()
            st.train_time_s += now - t_step
            t_step = now
            if st.step % cfg.log_every == 0:
                self.tally.read(st, self.logger.info)
            self._on_step_end(lr, grad_norm, not bad, out)
            bad = False

            reason = self.stop_reason()
            epoch_done = st.epoch_step == self.steps_per_epoch
            if self.cadence.due_mid_epoch(st.step) and not epoch_done and not reason:
                self.save_checkpoint()
            if epoch_done or reason:
                self.tally.read(st, self.logger.info)
                return None if epoch_done else reason  # at the epoch's end the caller finishes it, then stops
        raise RuntimeError(
            f"the train loader ended after {st.epoch_step} of {self.steps_per_epoch} steps in epoch {st.epoch}: "
            "its len() must match the batches it yields"
        )

    def stop_reason(self) -> str | None:
        """Why the run should stop now (``max_steps``, ``time_budget``, a hook), or None: the one stop rule."""
        if self.cfg.max_steps is not None and self.step >= self.cfg.max_steps:
            return "max_steps"
        if self.budget is not None and self.budget.progress() >= 1:
            return "time_budget"
        if self.should_stop:
            return "stopped_by_hook"
        return None

    def _finish_epoch(self) -> None:
        st = self.state
        st.epoch += 1
        st.epoch_step = 0
        val = {}
        if st.epoch % self.cfg.eval_every == 0 or st.epoch == self.cfg.epochs:
            val = self._run_eval()
        for h in self.hooks:
            if hasattr(h, "on_epoch_end"):
                h.on_epoch_end(self, st.epoch, val)
        self.save_checkpoint(is_best=bool(val.pop("_improved", False)))

    def fit(self, resume: bool | str | os.PathLike = False) -> dict:
        """Train to ``cfg.epochs`` (or ``max_steps`` / ``time_budget``); returns the summary.

        Args:
            resume: True continues from the run's latest checkpoint (fresh start if there is
                none); a path resumes from that checkpoint directory.

        An error from the data or the objective that every process agreed on first saves a
        checkpoint of the last completed step (when its weights are finite), then is raised;
        other processes raise ``TrainingError("rank R failed: ...")``.
        """
        restore(self, resume)
        self._t_fit = time.time()
        self.fit_start_step = self.step
        self._rng_at_step = None
        self.objective.train()
        self.logger.start_progress(self.total_steps, self.step)
        reason = "completed"
        try:
            while self.epoch < self.cfg.epochs and self.step < self.total_steps:
                stop = self._train_epoch()
                if stop is None:
                    self._finish_epoch()
                    stop = self.stop_reason()
                if stop is not None:
                    reason = stop
                    break
            if self._last_eval_step != self.step:
                val = self._run_eval()
                if self._last_saved_step != self.step:
                    self.save_checkpoint(is_best=bool(val.pop("_improved", False)))
            elif self._last_saved_step != self.step:
                self.save_checkpoint()
            if self.cfg.end_on_best:
                end_on_best(self)
            end_hook = getattr(self.objective, "on_fit_end", None)
            if self.is_main and callable(end_hook):
                end_hook(self)  # end-of-run products of the objective (MAE's reconstruction figure)
            summary = build_summary(self, reason, time.time() - self._t_fit)
            if self.is_main:
                write_summary(self.out_dir, summary)
                if self.cfg.plots:
                    write_plots(self.out_dir)
            barrier()
            return summary
        except AgreedFailure as failure:
            self._save_after_failure()
            raise failure.__cause__ from None
        finally:
            self.logger.close()
