"""Setting a run up for the loop: device, seeding, placement, distributed wrapping, optimizer,
schedule, EMA, clock, checkpointer and logs; and restoring a run to resume it."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .budget import Budget, parse_duration
from .callbacks import EmaCallback
from .checkpointer import Checkpointer
from .config import EngineConfig, OptimConfig
from .distributed import DistInfo, init_distributed, wrap_ddp, wrap_fsdp
from .logging import RunLogger
from .optim import StepTally, build_optimizer, scaled_lr, skips_on_device
from .protocol import Objective
from .runtime import (
    compile_mode,
    compile_step,
    loader_batch_size,
    resolve_amp,
    resolve_device,
    seed_everything,
)
from .schedule import LRSchedule


@dataclass
class TrainingSetup:
    """Everything the loop uses besides its counters, built once by :func:`setup_training`."""

    dist: DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    sampler: object
    module: nn.Module  # the objective, wrapped for DDP/FSDP when distributed
    train_fn: object  # ``module``, compiled under ``engine.compile`` / ``engine.cuda_graphs``
    params: list
    steps_per_epoch: int
    total_steps: int
    batch_size: int | None
    global_batch: int
    ema_callback: EmaCallback | None
    budget: Budget | None
    optimizer: torch.optim.Optimizer
    base_lr: float
    scheduler: LRSchedule
    scaler: torch.amp.GradScaler
    tally: StepTally
    logger: RunLogger
    checkpointer: Checkpointer

    def items(self):
        return ((f.name, getattr(self, f.name)) for f in fields(self))


def _check(cfg: EngineConfig) -> None:
    if cfg.accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {cfg.accum_steps}")
    if cfg.nonfinite not in ("stop", "skip"):
        raise ValueError(f"nonfinite must be 'stop' or 'skip', got {cfg.nonfinite!r}")
    if cfg.ema_decay is not None and cfg.fsdp:
        raise ValueError("ema_decay is not supported with fsdp=True (the EMA copy would be unsharded)")


def _place(objective: nn.Module, cfg: EngineConfig, device: torch.device) -> None:
    """Checkpointing, frozen modules and device placement, before anything copies the model."""
    model = objective.model
    if cfg.grad_checkpointing:
        if not callable(getattr(model, "set_grad_checkpointing", None)):
            raise ValueError(f"grad_checkpointing=True but {type(model).__name__} has no set_grad_checkpointing()")
        model.set_grad_checkpointing(True)
    if hasattr(objective, "freeze"):
        objective.freeze()  # frozen modules never reach the optimizer
    objective.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)


def defers_checks(device: torch.device, dist: DistInfo, scaler, optimizer, nonfinite: str, objective: nn.Module,
                  ema_callback: EmaCallback | None) -> bool:
    """Whether the loop checks losses on the device and reads the counts at log time only
    (:class:`~vitkit.engine.optim.StepTally`), so that a step never waits for the device.

    Where reading costs a wait: CUDA, in one process (processes agree on each micro-step at
    once), without fp16 loss scaling, with an optimizer that drops a step on the device (fused
    AdamW). Under ``nonfinite="skip"`` also nothing else may act on a step before knowing it was
    dropped: no EMA, and an objective without its own ``on_step_end``.
    """
    if device.type != "cuda" or dist.enabled or scaler.is_enabled() or not skips_on_device(optimizer):
        return False
    if nonfinite == "skip":
        return ema_callback is None and getattr(type(objective), "on_step_end", None) is Objective.on_step_end
    return True


def setup_training(
    objective: nn.Module,
    train_loader,
    cfg: EngineConfig,
    optim_cfg: OptimConfig,
    sched_cfg,
    out_dir: Path,
    ckpt_dir: Path,
    sampler=None,
    budget: Budget | None = None,
) -> TrainingSetup:
    """Prepare ``objective`` and build what the loop needs to train it (see :class:`~vitkit.engine.Trainer`)."""
    _check(cfg)
    dist = init_distributed()
    device = resolve_device(cfg.device, dist.local_rank)
    mode = compile_mode(cfg.compile, cfg.cuda_graphs, device)
    # Each process draws its own dropout/augmentation stream; model init happened before.
    seed_everything(cfg.seed + dist.rank)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if sampler is None:
        cand = getattr(train_loader, "sampler", None)
        if hasattr(cand, "set_epoch") and hasattr(cand, "load_state_dict"):
            sampler = cand

    _place(objective, cfg, device)
    amp_dtype = resolve_amp(cfg.amp, device)
    n_batches = len(train_loader)
    steps_per_epoch = n_batches // cfg.accum_steps
    if steps_per_epoch < 1:
        raise ValueError(
            f"the train loader has {n_batches} batches per epoch, fewer than accum_steps={cfg.accum_steps}: "
            "use a smaller batch or accum_steps"
        )
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    batch_size = loader_batch_size(train_loader)
    if batch_size is None and optim_cfg.scale_lr:
        raise ValueError("optim.scale_lr needs train_loader.batch_size; set it or use scale_lr=False")
    global_batch = (batch_size or 1) * dist.world_size * cfg.accum_steps

    ema_callback = EmaCallback(objective.model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay is not None else None
    module: nn.Module = objective
    if cfg.fsdp:
        module = wrap_fsdp(objective, device)
    elif dist.enabled:
        module = wrap_ddp(objective, device, cfg.find_unused_parameters)
    # The clock that drives the schedule and the stop under engine.time_budget.
    budget_s = parse_duration(cfg.time_budget)
    budget = (budget or Budget(budget_s)) if budget_s else None
    if budget is not None:
        budget.total_s = budget_s
    optimizer = build_optimizer(objective, optim_cfg, global_batch)
    base_lr = scaled_lr(optim_cfg, global_batch)
    scheduler = LRSchedule(optimizer, sched_cfg, base_lr, total_steps, steps_per_epoch, budget=budget)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    deferred = defers_checks(device, dist, scaler, optimizer, cfg.nonfinite, objective, ema_callback)
    logger = RunLogger(out_dir, enabled=dist.is_main, tensorboard=cfg.tensorboard)
    return TrainingSetup(
        dist=dist, device=device, amp_dtype=amp_dtype, sampler=sampler, module=module,
        train_fn=compile_step(module, mode, logger.info),
        params=[p for p in objective.parameters() if p.requires_grad],
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, batch_size=batch_size, global_batch=global_batch,
        ema_callback=ema_callback, budget=budget, optimizer=optimizer, base_lr=base_lr, scheduler=scheduler,
        scaler=scaler, tally=StepTally(device, deferred, cfg.nonfinite), logger=logger,
        checkpointer=Checkpointer(ckpt_dir, cfg.keep_last, cfg.save_best, dist.is_main),
    )


def restore(trainer, resume: bool | str | os.PathLike) -> None:
    """Load the checkpoint ``resume`` names into ``trainer``: True = the run's latest (none: a fresh start)."""
    if not resume:
        return
    path = ckpt.find_latest(trainer.out_dir) if resume is True else Path(resume)
    if path is None:
        trainer.logger.info(f"no checkpoint under {trainer.out_dir}: starting from scratch")
        return
    trainer.load_checkpoint(path)
    trainer.logger.truncate_after(trainer.step)
