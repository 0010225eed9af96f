"""The one training loop: every objective (supervised, distillation, self-supervised) runs here."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from .budget import Budget, loader_samples, parse_duration
from .config import EngineConfig, OptimConfig, ScheduleConfig
from .distributed import (
    all_gather_object,
    all_reduce_sum,
    barrier,
    fsdp_full_state,
    fsdp_load_full_state,
    init_distributed,
    is_dist,
    no_sync,
    wrap_ddp,
    wrap_fsdp,
)
from .ema import ModelEma
from .logging import RunLogger, write_plots, write_summary
from .optim import build_optimizer, scaled_lr
from .schedule import LRSchedule


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; training stopped before applying that step."""

    def __init__(self, step: int, value: float):
        self.step = step
        self.value = value
        super().__init__(
            f"non-finite loss {value} at optimizer step {step}; no update was applied and no checkpoint "
            "with these values was written. Lower optim.lr, set optim.clip_grad, use amp=bf16 rather than "
            "fp16, or set engine.nonfinite=skip to drop such steps."
        )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_has_native_bf16() -> bool:
    """True when this CPU executes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if torch.backends.cpu.get_cpu_capability().startswith("AMX"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None = full precision)."""
    amp = amp.lower()
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    raise ValueError(f"unknown amp {amp!r}: use 'bf16', 'fp16', 'none' or 'auto'")


def to_device(batch, device: torch.device):
    """Move tensors in nested dicts/lists/tuples to ``device``; other values pass through."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _channels_last(batch):
    if isinstance(batch, Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.ndim == 4 else batch
    if isinstance(batch, dict):
        return {k: _channels_last(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_channels_last(v) for v in batch)
    return batch


def _batch_size(batch) -> int:
    """Samples in a batch: the leading dim of its first tensor (first view for multi-view)."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.ndim else 1
    if isinstance(batch, dict):
        for v in batch.values():
            n = _batch_size(v)
            if n:
                return n
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    return 0


def _loader_batch_size(loader) -> int | None:
    bs = getattr(loader, "batch_size", None)
    if bs is None:
        bs = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return bs


class Trainer:
    """Trains an :class:`~vitkit.objectives.Objective`: amp, accumulation, clipping, schedule, EMA,
    checkpoints with exact resume, DDP/FSDP, logs.

    Args:
        objective: owns the model (``objective.model``) and any extra state.
        train_loader: iterable with ``len()`` yielding batches (dicts of tensors / lists of tensors).
        val_loader: optional; ``objective.evaluate`` runs over it.
        cfg, optim_cfg, sched_cfg: see :mod:`vitkit.engine.config`.
        out_dir: run directory (defaults to ``cfg.out_dir``).
        train_transform, eval_transform: ``batch -> batch`` callables applied on the device
            (batched augmentation, normalisation, mixup).
        sampler: the train sampler, for exact mid-epoch resume: it must have ``set_epoch(e)`` and
            ``load_state_dict({"epoch", "position"})`` (position = samples of this process already
            consumed in the epoch). Defaults to ``train_loader.sampler`` when that has them.
            Without one, a mid-epoch resume skips the consumed batches instead.
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
        if cfg.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {cfg.accum_steps}")
        if cfg.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {cfg.nonfinite!r}")

        self.dist = init_distributed()
        self.is_main = self.dist.is_main
        self.device = self._resolve_device()
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
        self.batch_size = _loader_batch_size(train_loader)
        if self.batch_size is None and self.optim_cfg.scale_lr:
            raise ValueError("optim.scale_lr needs train_loader.batch_size; set it or use scale_lr=False")
        self.global_batch = (self.batch_size or 1) * self.dist.world_size * cfg.accum_steps

        self.ema = None
        if cfg.ema_decay is not None:
            if cfg.fsdp:
                raise ValueError("ema_decay is not supported with fsdp=True (the EMA copy would be unsharded)")
            self.ema = ModelEma(model, cfg.ema_decay)

        self.module: nn.Module = objective
        if cfg.fsdp:
            self.module = wrap_fsdp(objective, self.device)
        elif self.dist.enabled:
            self.module = wrap_ddp(objective, self.device, cfg.find_unused_parameters)
        # budget: the clock that drives the schedule and the stop under engine.time_budget
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

        self.logger = RunLogger(self.out_dir, enabled=self.is_main, tensorboard=cfg.tensorboard)
        # Progress counters, all saved in checkpoints.
        self.step = 0
        self.epoch = 0
        self.epoch_step = 0
        self.best_metric: float | None = None
        self.best_val_acc: float | None = None
        self.nonfinite_skipped = 0
        self.skipped_files = 0
        self.train_samples = 0
        self.train_time_s = 0.0
        self.should_stop = False
        self.last_val: dict[str, float] = {}
        self._last_saved_step = -1
        self._last_eval_step = -1
        self._resume_sampler_state: dict | None = None
        self._fit_start_step = 0

    def _resolve_device(self) -> torch.device:
        want = self.cfg.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("device=cuda but CUDA is not available: use device=cpu or auto")
            return torch.device("cuda", self.dist.local_rank)
        return torch.device(want)

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _prepare(self, batch, transform):
        batch = to_device(batch, self.device)
        if transform is not None:
            batch = transform(batch)
        if self.cfg.channels_last:
            batch = _channels_last(batch)
        return batch

    # ------------------------------------------------------------------ checkpoints

    def state_for_checkpoint(self, optim_state: dict | None = None) -> dict:
        """``trainer_state.pt`` content: tensors and primitive containers only."""
        if optim_state is None:
            optim_state = self.optimizer.state_dict()
        return {
            "step": self.step,
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": all_gather_object(ckpt.get_rng_state()),
            "sampler": self._sampler_state(),
            "best_metric": self.best_metric,
            "best_val_acc": self.best_val_acc,
            "nonfinite_skipped": self.nonfinite_skipped,
            "skipped_files": self.skipped_files,
            "train_samples": self.train_samples,
            "train_time_s": self.train_time_s,
            "budget": self.budget.state_dict() if self.budget is not None else None,  # budget
            "world_size": self.dist.world_size,
            "config": self.config_to_save,
        }

    def _sampler_state(self) -> dict:
        # The position is computed from the steps taken rather than read from the sampler: a
        # DataLoader prefetches, so the sampler has handed out more indices than were trained on.
        state = dict(self.sampler.state_dict()) if hasattr(self.sampler, "state_dict") else {}
        state["epoch"] = self.epoch
        state["position"] = self.epoch_step * self.cfg.accum_steps * (self.batch_size or 1)
        return state

    def save_checkpoint(self, is_best: bool = False) -> Path | None:
        """Write a checkpoint of the current step (main process); all processes must call it."""
        if self.cfg.fsdp:
            objective_sd, optim_sd = fsdp_full_state(self.objective, self.optimizer)
            model_sd = {k[len("model."):]: v for k, v in objective_sd.items() if k.startswith("model.")}
        else:
            objective_sd, optim_sd = self.objective.state_dict(), None
            model_sd = self.objective.model.state_dict()
        state = self.state_for_checkpoint(optim_sd)  # collective (RNG gather): every rank takes part
        path = None
        if self.is_main:
            weights = {
                "model": model_sd,
                "objective": objective_sd,
                "ema": self.ema.module.state_dict() if self.ema is not None else None,
            }
            path = ckpt.save_checkpoint(self.ckpt_dir, self.step, weights, state, keep_last=self.cfg.keep_last)
            if is_best and self.cfg.save_best:
                ckpt.save_best(self.ckpt_dir, path)
        self._last_saved_step = self.step
        barrier()
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore objective, EMA, optimizer, schedule, scaler, counters and RNG from ``path``."""
        data = ckpt.load_checkpoint(path, map_location="cpu")
        st = data["trainer_state"]
        if self.cfg.fsdp:
            fsdp_load_full_state(self.objective, self.optimizer, data["objective"], st["optimizer"])
        else:
            self.objective.load_state_dict(data["objective"])
            self.optimizer.load_state_dict(st["optimizer"])
        if self.ema is not None:
            if data["ema"] is None:
                raise ValueError(f"{data['path']} has no ema.safetensors but ema_decay is set")
            self.ema.module.load_state_dict(data["ema"])
        if self.budget is not None and st.get("budget"):  # budget: before the schedule reads it
            self.budget.load_state_dict(st["budget"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        for k in ("step", "epoch", "epoch_step", "nonfinite_skipped", "skipped_files", "train_samples"):
            setattr(self, k, int(st[k]))
        self.train_time_s = float(st["train_time_s"])
        self.best_metric, self.best_val_acc = st["best_metric"], st["best_val_acc"]
        self._resume_sampler_state = st["sampler"]
        rng = st["rng"]
        if len(rng) != self.dist.world_size:
            self.logger.info(
                f"checkpoint was written by {len(rng)} processes, this run has {self.dist.world_size}: "
                "random streams restart from rank 0's state (training continues, not bitwise)"
            )
        ckpt.set_rng_state(rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0])
        self._last_saved_step = self.step
        self.logger.info(f"resumed from {data['path']} at step {self.step} (epoch {self.epoch})")

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, use_ema: bool = False) -> dict[str, float]:
        """Average ``objective.evaluate`` over the validation set (summed across processes).

        With ``use_ema`` the EMA weights stand in for ``objective.model`` during the pass.
        """
        if self.val_loader is None:
            return {}
        obj = self.objective
        saved_model = obj.model
        if use_ema:
            if self.ema is None:
                raise ValueError("evaluate(use_ema=True) needs engine.ema_decay set")
            obj.model = self.ema.module
        was_training = obj.training
        obj.eval()
        sums: dict[str, Tensor] = {}
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        try:
            for batch in self.val_loader:
                batch = self._prepare(batch, self.eval_transform)
                if not use_ema and "skipped" in batch:
                    self.skipped_files += int(batch["skipped"].sum())
                with self._autocast():
                    out = obj.evaluate(batch)
                n = None
                for k, v in out.items():
                    v = v.detach().double()
                    if v.ndim != 1 or (n is not None and v.shape[0] != n):
                        raise ValueError(
                            f"{type(obj).__name__}.evaluate must return per-sample tensors of shape (B,); "
                            f"{k!r} has shape {tuple(v.shape)}"
                        )
                    n = v.shape[0]
                    sums[k] = sums[k] + v.sum() if k in sums else v.sum()
                count += n or 0
        finally:
            obj.model = saved_model
            obj.train(was_training)
        keys = sorted(sums)
        # One all-reduce for every metric and the count: ranks see different val shards.
        packed = all_reduce_sum(torch.stack([sums[k] for k in keys] + [count]))
        total = packed[-1].item()
        if total == 0:
            return {}
        return {k: packed[i].item() / total for i, k in enumerate(keys)}

    def _run_eval(self) -> dict[str, float]:
        t_eval = time.perf_counter()
        val = self.evaluate()
        if self.ema is not None and val:
            val.update({f"ema_{k}": v for k, v in self.evaluate(use_ema=True).items()})
        if self.budget is not None:  # budget: a measured eval sizes the reserve for the final one
            self.budget.note_eval(time.perf_counter() - t_eval)
        self._last_eval_step = self.step
        self.last_val = val
        if not val:
            return val
        improved = False
        if "acc1" in val:
            improved = self.best_metric is None or val["acc1"] > self.best_metric
            self.best_val_acc = max(val["acc1"], self.best_val_acc or 0.0)
            if improved:
                self.best_metric = val["acc1"]
        elif "loss" in val:
            # Without accuracy (self-supervised), lower validation loss is better.
            improved = self.best_metric is None or -val["loss"] > self.best_metric
            if improved:
                self.best_metric = -val["loss"]
        val["_improved"] = improved
        self.logger.log({"kind": "val", "step": self.step, "epoch": self.epoch, **val})
        parts = " ".join(f"{k}={v:.4f}" for k, v in val.items() if not k.startswith("_"))
        self.logger.info(f"eval step {self.step} epoch {self.epoch}: {parts}")
        return val

    # ------------------------------------------------------------------ training

    def _check_finite(self, loss: Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float()
        if is_dist():
            # Every rank must take the same branch, or DDP's gradient sync would hang.
            finite = all_reduce_sum(finite.reshape(1))[0] / self.dist.world_size
        return bool(finite == 1)

    def _optimizer_step(self) -> Tensor | None:
        grad_norm = None
        if self.optim_cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.optim_cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _train_epoch(self, t_fit: float) -> str | None:
        """Run the rest of the current epoch; returns a stop reason, or None at the epoch's end."""
        cfg = self.cfg
        accum = cfg.accum_steps
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
            if self.epoch_step:
                self.sampler.load_state_dict(self._resume_sampler_state or self._sampler_state())
        self._resume_sampler_state = None
        # Creating the iterator draws from the global RNG (worker seeds); keep that out of the
        # training stream so a resumed run, which creates it at a different point, stays in step.
        with torch.random.fork_rng(devices=[]):
            it = iter(self.train_loader)
        if self.sampler is None and self.epoch_step:
            for _ in range(self.epoch_step * accum):
                next(it)

        window = {"t": time.perf_counter(), "samples": 0, "sums": {}, "n": 0}
        micro = 0
        bad = False
        out: dict[str, Tensor] = {}
        t_step = time.perf_counter()
        for batch in it:
            batch = self._prepare(batch, self.train_transform)
            if "skipped" in batch:
                self.skipped_files += int(batch["skipped"].sum())
            n = _batch_size(batch)
            if hasattr(self.sampler, "advance"):
                self.sampler.advance(n)
            micro += 1
            last_micro = micro == accum
            with no_sync(self.module, self.dist.enabled and not last_micro), self._autocast():
                out = self._train_fn(batch)
            loss = out["loss"]
            if not self._check_finite(loss):
                if cfg.nonfinite == "stop":
                    raise NonFiniteLossError(self.step + 1, float(loss.detach().float()))
                bad = True
            if not bad:
                self.scaler.scale(loss / accum).backward()
                for k, v in out.items():
                    v = v.detach().float()
                    window["sums"][k] = window["sums"][k] + v if k in window["sums"] else v
                window["n"] += 1
            window["samples"] += n
            self.train_samples += n * self.dist.world_size
            if not last_micro:
                continue

            micro = 0
            lr = self.scheduler.get_lr()
            grad_norm = None
            if bad:
                self.optimizer.zero_grad(set_to_none=True)
                self.nonfinite_skipped += 1
                self.logger.info(f"step {self.step + 1}: non-finite loss, step skipped ({self.nonfinite_skipped})")
            else:
                grad_norm = self._optimizer_step()
            self.step += 1
            self.epoch_step += 1
            self.scheduler.step()
            if not bad:
                if self.ema is not None:
                    self.ema.update(self.objective.model)
                self.objective.on_step_end(self.step, self.total_steps)
            bad = False
            now = time.perf_counter()
            self.train_time_s += now - t_step
            t_step = now
            if self.budget is not None:  # budget: size the end reserve from the measured train rate
                self.budget.on_step(self.step, self.train_samples, self.train_time_s, loader_samples(self.val_loader))
            step_metrics = {k: v.detach() for k, v in out.items()}
            step_metrics["lr"] = lr
            if grad_norm is not None:
                step_metrics["grad_norm"] = grad_norm.detach()
            for h in self.hooks:
                if hasattr(h, "on_step_end"):
                    h.on_step_end(self, self.step, step_metrics)

            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                self._log_window(window, lr, grad_norm)

            reason = self._stop_reason(t_fit)
            epoch_done = self.epoch_step == self.steps_per_epoch
            if cfg.ckpt_every_steps and self.step % cfg.ckpt_every_steps == 0 and not epoch_done and not reason:
                self.save_checkpoint()
            if epoch_done:
                return None  # the caller finishes the epoch (eval, checkpoint), then stops
            if reason:
                return reason
        raise RuntimeError(
            f"the train loader ended after {self.epoch_step} of {self.steps_per_epoch} steps in epoch {self.epoch}: "
            "its len() must match the batches it yields"
        )

    def _log_window(self, window: dict, lr: float, grad_norm: Tensor | None) -> None:
        now = time.perf_counter()
        record = {"kind": "train", "step": self.step, "epoch": self.epoch, "lr": lr}
        if window["n"]:
            record.update({k: (v / window["n"]).item() for k, v in window["sums"].items()})
        if grad_norm is not None:
            record["grad_norm"] = grad_norm.item()
        record["img_per_s"] = window["samples"] * self.dist.world_size / max(now - window["t"], 1e-9)
        self.logger.log(record)
        steps_left = self.total_steps - self.step
        rate = self.train_time_s / max(1, self.step - self._fit_start_step)
        eta = self.budget.remaining() if self.budget is not None else steps_left * rate  # budget
        self.logger.progress(self.step, self.total_steps, record, eta)
        window.update(t=now, samples=0, sums={}, n=0)

    def _stop_reason(self, t_fit: float) -> str | None:
        if self.cfg.max_steps is not None and self.step >= self.cfg.max_steps:
            return "max_steps"
        if self.budget is not None and self.budget.progress() >= 1:  # budget
            return "time_budget"
        if self.should_stop:
            return "stopped_by_hook"
        return None

    def fit(self, resume: bool | str | os.PathLike = False) -> dict:
        """Train to ``cfg.epochs`` (or ``max_steps`` / ``time_budget``); returns the summary.

        Args:
            resume: True continues from the run's latest checkpoint (fresh start if there is
                none); a path resumes from that checkpoint directory.
        """
        if resume:
            path = ckpt.find_latest(self.out_dir) if resume is True else Path(resume)
            if path is not None:
                self.load_checkpoint(path)
                self.logger.truncate_after(self.step)
            else:
                self.logger.info(f"no checkpoint under {self.out_dir}: starting from scratch")
        t_fit = time.time()
        self._fit_start_step = self.step
        self.objective.train()
        self.logger.start_progress(self.total_steps, self.step)
        reason = "completed"
        try:
            while self.epoch < self.cfg.epochs and self.step < self.total_steps:
                stop = self._train_epoch(t_fit)
                if stop is None:
                    self.epoch += 1
                    self.epoch_step = 0
                    val = {}
                    if self.epoch % self.cfg.eval_every == 0 or self.epoch == self.cfg.epochs:
                        val = self._run_eval()
                    for h in self.hooks:
                        if hasattr(h, "on_epoch_end"):
                            h.on_epoch_end(self, self.epoch, val)
                    self.save_checkpoint(is_best=bool(val.pop("_improved", False)))
                    stop = self._stop_reason(t_fit)
                if stop is not None:
                    reason = stop
                    break
            if self._last_eval_step != self.step:
                val = self._run_eval()
                if self._last_saved_step != self.step:
                    self.save_checkpoint(is_best=bool(val.pop("_improved", False)))
            elif self._last_saved_step != self.step:
                self.save_checkpoint()
            summary = self._summary(reason, time.time() - t_fit)
            if self.is_main:
                write_summary(self.out_dir, summary)
                if self.cfg.plots:
                    write_plots(self.out_dir)
            return summary
        finally:
            self.logger.close()

    def _summary(self, reason: str, wall_s: float) -> dict:
        counts = all_reduce_sum(torch.tensor([self.skipped_files, self.nonfinite_skipped], dtype=torch.float64))
        val = {k: v for k, v in self.last_val.items() if not k.startswith("_")}
        summary = {
            "val_acc": val.get("acc1"),
            "best_val_acc": self.best_val_acc,
            "val_loss": val.get("loss"),
            "epochs": self.epoch + self.epoch_step / self.steps_per_epoch,
            "steps": self.step,
            "total_steps": self.total_steps,
            "stopped": reason,
            "wall_s": wall_s,
            "train_time_s": self.train_time_s,
            "train_img_per_s": self.train_samples / self.train_time_s if self.train_time_s > 0 else 0.0,
            "skipped_files": int(counts[0]),
            "nonfinite_skipped": int(self.nonfinite_skipped),
            "world_size": self.dist.world_size,
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "none",
            "global_batch": self.global_batch,
            "base_lr": self.base_lr,
        }
        if self.ema is not None:
            summary["val_acc_ema"] = val.get("ema_acc1")
        summary.update({f"val_{k}": v for k, v in val.items() if f"val_{k}" not in summary and k != "acc1"})
        return summary
