"""The one training loop: every objective (supervised, distillation, self-supervised) runs here."""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import TrainingError
from ..objectives.base import StepContext
from . import checkpoint as ckpt
from .budget import Budget, loader_samples, parse_duration
from .callbacks import CheckpointCadence, EmaCallback, TrainLogger
from .checkpointer import Checkpointer
from .config import EngineConfig, OptimConfig, ScheduleConfig
from .distributed import (
    agree_on_failure,
    all_reduce_sum,
    barrier,
    init_distributed,
    is_dist,
    no_sync,
    wrap_ddp,
    wrap_fsdp,
)
from .evaluation import run_evaluation
from .logging import RunLogger, write_summary
from .optim import build_optimizer, scaled_lr
from .plots import write_plots
from .runtime import (
    autocast,
    batch_size,
    channels_last,
    loader_batch_size,
    resolve_amp,
    resolve_device,
    seed_everything,
    to_device,
)
from .schedule import LRSchedule
from .state import TrainState
from .summary import build_summary

__all__ = ["NonFiniteLossError", "Trainer", "resolve_amp", "seed_everything"]


class NonFiniteLossError(TrainingError):
    """The loss became NaN or inf; training stopped before applying that step."""

    def __init__(self, step: int, value: float):
        self.step = step
        self.value = value
        super().__init__(
            f"non-finite loss {value} at optimizer step {step}; no update was applied and no checkpoint "
            "with these values was written. Lower optim.lr, set optim.clip_grad, use amp=bf16 rather than "
            "fp16, or set engine.nonfinite=skip to drop such steps."
        )


class _AgreedFailure(Exception):
    """Marks an error that every process learned of at the same point (all may checkpoint together)."""


def _takes_context(fn) -> bool:
    """Whether an ``on_step_end`` takes one StepContext rather than the older ``(step, total_steps)``."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
    except (TypeError, ValueError):
        return True
    return len(params) == 1


class Trainer:
    """Trains an :class:`~vitkit.objectives.Objective`: amp, accumulation, clipping, schedule, EMA,
    checkpoints with exact resume, DDP/FSDP, logs.

    The loop lives here; the pieces it uses each live in their own file: counters in
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
        hooks: objects with optional ``on_step_end(trainer, step, metrics)`` (metrics: detached
            tensors of the last micro-batch plus ``lr``) and ``on_epoch_end(trainer, epoch, val)``.
            Setting ``trainer.should_stop = True`` ends the run cleanly after the current step.
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
        self.objective_name = getattr(objective, "registered_name", None) or type(objective).__name__
        if cfg.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {cfg.accum_steps}")
        if cfg.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {cfg.nonfinite!r}")

        self.dist = init_distributed()
        self.is_main = self.dist.is_main
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        # Each process draws its own dropout/augmentation stream; model init happened before.
        seed_everything(cfg.seed + self.dist.rank)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False

        if sampler is None:
            cand = getattr(train_loader, "sampler", None)
            if hasattr(cand, "set_epoch") and hasattr(cand, "load_state_dict"):
                sampler = cand
        self.sampler = sampler

        model = objective.model
        if cfg.grad_checkpointing:
            if not callable(getattr(model, "set_grad_checkpointing", None)):
                raise ValueError(f"grad_checkpointing=True but {type(model).__name__} has no set_grad_checkpointing()")
            model.set_grad_checkpointing(True)
        if hasattr(objective, "freeze"):
            objective.freeze()  # frozen modules never reach the optimizer
        objective.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.objective = objective
        self.amp_dtype = resolve_amp(cfg.amp, self.device)

        n_batches = len(train_loader)
        self.steps_per_epoch = n_batches // cfg.accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the train loader has {n_batches} batches per epoch, fewer than accum_steps={cfg.accum_steps}: "
                "use a smaller batch or accum_steps"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.batch_size = loader_batch_size(train_loader)
        if self.batch_size is None and self.optim_cfg.scale_lr:
            raise ValueError("optim.scale_lr needs train_loader.batch_size; set it or use scale_lr=False")
        self.global_batch = (self.batch_size or 1) * self.dist.world_size * cfg.accum_steps

        self.ema_callback = None
        if cfg.ema_decay is not None:
            if cfg.fsdp:
                raise ValueError("ema_decay is not supported with fsdp=True (the EMA copy would be unsharded)")
            self.ema_callback = EmaCallback(model, cfg.ema_decay, cfg.ema_warmup)

        self.module: nn.Module = objective
        if cfg.fsdp:
            self.module = wrap_fsdp(objective, self.device)
        elif self.dist.enabled:
            self.module = wrap_ddp(objective, self.device, cfg.find_unused_parameters)
        # The clock that drives the schedule and the stop under engine.time_budget.
        budget_s = parse_duration(cfg.time_budget)
        self.budget = (budget or Budget(budget_s)) if budget_s else None
        if self.budget is not None:
            self.budget.total_s = budget_s
        self.optimizer = build_optimizer(objective, self.optim_cfg, self.global_batch)
        self.base_lr = scaled_lr(self.optim_cfg, self.global_batch)
        self.scheduler = LRSchedule(
            self.optimizer, self.sched_cfg, self.base_lr, self.total_steps, self.steps_per_epoch,
            budget=self.budget,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self._train_fn = torch.compile(self.module) if cfg.compile else self.module
        self._params = [p for p in objective.parameters() if p.requires_grad]
        hook = getattr(objective, "on_step_end", None)
        self._objective_hook_ctx = hook is not None and _takes_context(hook)

        self.logger = RunLogger(self.out_dir, enabled=self.is_main, tensorboard=cfg.tensorboard)
        self.state = TrainState()
        self.checkpointer = Checkpointer(self.ckpt_dir, cfg.keep_last, cfg.save_best, self.is_main)
        self.cadence = CheckpointCadence(cfg.ckpt_every_steps)
        self.train_log = TrainLogger(self.logger, cfg.log_every, self.dist.world_size)
        self.should_stop = False
        self.last_val: dict[str, float] = {}
        self.resume_sampler_state: dict | None = None
        self._last_saved_step = -1
        self._last_eval_step = -1
        self._fit_start_step = 0
        self._t_fit = 0.0
        self._rng_at_step: tuple | None = None
        self.last_evaluator = None

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

    # ------------------------------------------------------------------ plumbing

    def _autocast(self):
        return autocast(self.amp_dtype, self.device)

    def _prepare(self, batch, transform):
        batch = to_device(batch, self.device)
        if transform is not None:
            batch = transform(batch)
        if self.cfg.channels_last:
            batch = channels_last(batch)
        return batch

    def _agree(self, error: BaseException | None) -> None:
        """A point where all processes learn whether any failed (see ``agree_on_failure``)."""
        try:
            agree_on_failure(error)
        except BaseException as e:
            raise _AgreedFailure() from e

    # ------------------------------------------------------------------ checkpoints

    def sampler_state(self) -> dict:
        """The train sampler's position, from the steps taken (what ``trainer_state.pt`` stores)."""
        # Computed from the steps rather than read from the sampler: a DataLoader prefetches, so
        # the sampler has handed out more indices than were trained on.
        state = dict(self.sampler.state_dict()) if hasattr(self.sampler, "state_dict") else {}
        state["epoch"] = self.state.epoch
        state["position"] = self.state.epoch_step * self.cfg.accum_steps * (self.batch_size or 1)
        return state

    def save_checkpoint(self, is_best: bool = False, rng: dict | None = None) -> Path | None:
        """Write a checkpoint of the current step (main process); all processes must call it.

        A failure on the main process (non-finite weights) reaches every process.
        """
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
            lambda b: self._prepare(b, self.eval_transform), self._autocast, count_skipped,
        )

    def _run_eval(self) -> dict[str, float]:
        error, val = None, {}
        t_eval = time.perf_counter()
        try:
            val = self.evaluate()
            if self.ema is not None and val:
                val.update({f"ema_{k}": v for k, v in self.evaluate(use_ema=True).items()})
        except Exception as e:
            error = e
        self._agree(error)
        if self.budget is not None:  # a measured eval sizes the reserve for the final one
            self.budget.note_eval(time.perf_counter() - t_eval)
        self._last_eval_step = self.step
        self.last_val = val
        if not val:
            return val
        st = self.state
        if "acc1" in val:
            st.best_val_acc = max(val["acc1"], st.best_val_acc or 0.0)
        improved = False
        evaluator = self.last_evaluator
        if evaluator.primary in val:
            improved = st.improves(val[evaluator.primary], evaluator.higher_is_better)
            if improved:
                st.best_metric, st.best_metric_name = val[evaluator.primary], evaluator.primary
        val["_improved"] = improved
        self.logger.log({"kind": "val", "step": self.step, "epoch": self.epoch, **val})
        parts = " ".join(f"{k}={v:.4f}" for k, v in val.items() if isinstance(v, float) and not k.startswith("_"))
        self.logger.info(f"eval step {self.step} epoch {self.epoch}: {parts}")
        return val

    # ------------------------------------------------------------------ training

    def _step_checks(self, loss: Tensor | None, error: BaseException | None) -> bool:
        """Whether ``loss`` is finite on every process; also the agreed-error point of a micro-step."""
        if not is_dist():
            if error is not None:
                raise _AgreedFailure() from error
            return bool(torch.isfinite(loss.detach()))
        # One all-reduce carries both: every rank must take the same branch, or DDP's gradient
        # sync would hang.
        flags = torch.zeros(2, device=loss.device if loss is not None else self.device)
        flags[0] = 1.0 if error is not None else 0.0
        if loss is not None:
            flags[1] = torch.isfinite(loss.detach()).float()
        flags = all_reduce_sum(flags)
        if flags[0] > 0:
            self._agree(error)
        return bool(flags[1] == self.dist.world_size)

    def _optimizer_step(self) -> Tensor | None:
        grad_norm = None
        if self.optim_cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.optim_cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _epoch_iterator(self):
        st = self.state
        if self.sampler is not None:
            self.sampler.set_epoch(st.epoch)
            if st.epoch_step:
                self.sampler.load_state_dict(self.resume_sampler_state or self.sampler_state())
        elif hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(st.epoch)  # streaming shards reshuffle per epoch
        self.resume_sampler_state = None
        # Creating the iterator draws from the global RNG (worker seeds); keep that out of the
        # training stream so a resumed run, which creates it at a different point, stays in step.
        with torch.random.fork_rng(devices=[]):
            it = iter(self.train_loader)
        if self.sampler is None and st.epoch_step:
            for _ in range(st.epoch_step * self.cfg.accum_steps):
                next(it)
        return it

    def _next_batch(self, it):
        """The next prepared batch, or None at the loader's end; data errors are agreed on."""
        batch, error = None, None
        try:
            batch = next(it, None)
            if batch is not None:
                batch = self._prepare(batch, self.train_transform)
        except Exception as e:
            error = e
        if is_dist():
            self._agree(error)
        elif error is not None:
            raise _AgreedFailure() from error
        return batch

    def _on_step_end(self, lr: float, grad_norm: Tensor | None, applied: bool, out: dict) -> None:
        st = self.state
        if applied:
            if self.ema_callback is not None:
                self.ema_callback.on_step_end(self.objective.model)
            if self._objective_hook_ctx:
                self.objective.on_step_end(StepContext(st.step, self.total_steps, self.optimizer, self))
            else:
                self.objective.on_step_end(st.step, self.total_steps)
        self._rng_at_step = ckpt.capture_rng_state()
        step_metrics = {k: v.detach() for k, v in out.items()}
        step_metrics["lr"] = lr
        if grad_norm is not None:
            step_metrics["grad_norm"] = grad_norm.detach()
        for h in self.hooks:
            if hasattr(h, "on_step_end"):
                h.on_step_end(self, st.step, step_metrics)
        if self.budget is not None:  # size the end reserve from the measured train rate
            self.budget.on_step(st.step, st.train_samples, st.train_time_s, loader_samples(self.val_loader))
            eta = self.budget.remaining()
            # The step count the budget will reach at the current rate, for the progress display.
            shown = min(self.total_steps, st.step + round(eta * st.step / max(st.train_time_s, 1e-9)))
        else:
            eta = (self.total_steps - st.step) * st.train_time_s / max(1, st.step - self._fit_start_step)
            shown = None
        self.train_log.on_step_end(st, self.total_steps, lr, grad_norm, eta, shown_total=shown)

    def _train_epoch(self) -> str | None:
        """Run the rest of the current epoch; returns a stop reason, or None at the epoch's end."""
        cfg, st = self.cfg, self.state
        accum = cfg.accum_steps
        it = self._epoch_iterator()
        self.train_log.reset()
        micro = 0
        bad = False
        out: dict[str, Tensor] = {}
        t_step = time.perf_counter()
        while (batch := self._next_batch(it)) is not None:
            if "skipped" in batch:
                st.skipped_files += int(batch["skipped"].sum())
            n = batch_size(batch)
            if hasattr(self.sampler, "advance"):
                self.sampler.advance(n)
            micro += 1
            last_micro = micro == accum
            loss, error = None, None
            try:
                with no_sync(self.module, self.dist.enabled and not last_micro), self._autocast():
                    out = self._train_fn(batch)
                loss = out["loss"]
            except Exception as e:
                error = e
            if not self._step_checks(loss, error):
                if cfg.nonfinite == "stop":
                    raise NonFiniteLossError(st.step + 1, float(loss.detach().float()))
                bad = True
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
                grad_norm = self._optimizer_step()
            st.step += 1
            st.epoch_step += 1
            self.scheduler.step()
            now = time.perf_counter()
            st.train_time_s += now - t_step
            t_step = now
            self._on_step_end(lr, grad_norm, not bad, out)
            bad = False

            reason = self.stop_reason()
            epoch_done = st.epoch_step == self.steps_per_epoch
            if self.cadence.due_mid_epoch(st.step) and not epoch_done and not reason:
                self.save_checkpoint()
            if epoch_done:
                return None  # the caller finishes the epoch (eval, checkpoint), then stops
            if reason:
                return reason
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
        if resume:
            path = ckpt.find_latest(self.out_dir) if resume is True else Path(resume)
            if path is not None:
                self.load_checkpoint(path)
                self.logger.truncate_after(self.step)
            else:
                self.logger.info(f"no checkpoint under {self.out_dir}: starting from scratch")
        self._t_fit = time.time()
        self._fit_start_step = self.step
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
        except _AgreedFailure as failure:
            self._save_after_failure()
            raise failure.__cause__ from None
        finally:
            self.logger.close()
