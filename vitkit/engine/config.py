"""Engine configuration: every default of the training loop lives here.

Plain dataclasses with types OmegaConf structured configs accept (str for choices, Optional,
tuples), so the CLI composes them into the run's top-level config.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OptimConfig:
    """Optimizer settings.

    ``lr`` is the learning rate for a global batch of 512; with ``scale_lr`` the engine uses
    ``lr * global_batch / 512`` (global batch = per-process batch x processes x accum_steps).
    """

    name: str = "adamw"  # adamw | sgd
    lr: float = 5e-4
    scale_lr: bool = True
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    layer_decay: float | None = None
    clip_grad: float | None = None
    # global: one norm over all gradients (timm, DeiT); per_param: each parameter's gradient norm
    # clipped to clip_grad on its own (DINO's and iBOT's clip_gradients, a much weaker constraint).
    clip_mode: str = "global"


@dataclass
class ScheduleConfig:
    """Per-optimizer-step learning-rate schedule.

    ``cosine``: linear warmup from ``warmup_lr`` to the base lr, then cosine to ``min_lr``.
    ``onecycle``: cosine-shaped rise from ``warmup_lr`` to the base lr, then cosine to ``min_lr``.
    ``constant``: linear warmup, then the base lr. ``warmup_steps`` overrides ``warmup_epochs``.
    """

    name: str = "cosine"  # cosine | onecycle | constant
    warmup_epochs: float = 5.0
    warmup_steps: int | None = None
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6


@dataclass
class EngineConfig:
    """The training loop.

    ``max_steps`` caps optimizer steps (and shortens the schedule to match). ``time_budget``
    ("90s", "10m", "2h", "1h30m" or seconds) bounds the whole run's wall-clock: the lr schedule
    follows the elapsed share of the budget and anneals when it ends, and the final evaluation,
    checkpoint and summary fit inside it (see :mod:`vitkit.engine.budget`). ``amp="auto"`` picks bf16 on CUDA with bf16 support or on a CPU with native bf16
    instructions, else none. ``nonfinite="skip"`` drops optimizer steps whose loss is NaN/inf
    (counted in the summary) instead of stopping.
    """

    epochs: int = 100
    max_steps: int | None = None
    time_budget: str | None = None
    accum_steps: int = 1
    amp: str = "auto"  # bf16 | fp16 | fp32 (= none) | auto
    ema_decay: float | None = None
    ema_warmup: bool = True  # decay min(ema_decay, (1 + t) / (10 + t)) at update t
    # torch.compile of the training step (the objective's forward: model and loss). None: on CUDA, off
    # on a CPU (not yet measured on a GPU, so the default stays off). A compile that fails falls back
    # to eager with one line.
    compile: bool | None = False
    # CUDA graphs of the compiled step (torch.compile's "reduce-overhead"): CUDA only, and every train
    # batch the same shape (the train loader drops the last partial batch).
    cuda_graphs: bool = False
    channels_last: bool = False
    grad_checkpointing: bool = False
    eval_every: int = 1  # epochs
    log_every: int = 10  # optimizer steps
    ckpt_every_steps: int | None = None
    keep_last: int = 2
    save_best: bool = True
    # At the end, when checkpoints/best/ holds an earlier step than the last, its weights become the run's
    # (model.safetensors; the summary's val_* re-evaluated on them), as HF Trainer's load_best_model_at_end.
    end_on_best: bool = False
    seed: int = 0
    nonfinite: str = "stop"  # stop | skip
    deterministic: bool = False
    fsdp: bool = False
    find_unused_parameters: bool = False
    device: str = "auto"  # auto | cpu | cuda
    tensorboard: bool = True
    plots: bool = True
    out_dir: str = "runs/default"
    # Early stop: when the validation metric has not improved for this share of the run's budget (time
    # budget, else epochs), anneal the lr (cosine, onecycle) and stop (vitkit.engine.budget.PlateauStop);
    # None never stops early. Validation sets under plateau_min_val images never stop early.
    plateau_patience: float | None = None
    plateau_min_val: int = 200
