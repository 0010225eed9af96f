"""The training engine: one loop for every objective (see :class:`Trainer`)."""

from .checkpoint import (
    NonFiniteWeightsError,
    find_latest,
    get_rng_state,
    load_checkpoint,
    save_best,
    save_checkpoint,
    set_rng_state,
)
from .config import EngineConfig, OptimConfig, ScheduleConfig
from .distributed import init_distributed, is_main_process
from .ema import ModelEma
from .optim import build_optimizer, param_groups
from .schedule import LRSchedule, lr_at
from .trainer import NonFiniteLossError, Trainer, seed_everything

__all__ = [
    "EngineConfig",
    "LRSchedule",
    "ModelEma",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "OptimConfig",
    "ScheduleConfig",
    "Trainer",
    "build_optimizer",
    "find_latest",
    "get_rng_state",
    "init_distributed",
    "is_main_process",
    "load_checkpoint",
    "lr_at",
    "param_groups",
    "save_best",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]
