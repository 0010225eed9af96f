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
from .distributed import all_gather_with_grad, init_distributed
from .ema import ModelEma, ema_decay_at, ema_update
from .evaluators import (
    AccuracyEvaluator,
    DepthEvaluator,
    Evaluator,
    KNNEvaluator,
    MeanEvaluator,
    MIoUEvaluator,
)
from .optim import build_optimizer, param_groups
from .protocol import Objective, StepContext
from .runtime import seed_everything
from .schedule import LRSchedule, lr_at
from .state import TrainState
from .trainer import NonFiniteLossError, Trainer

__all__ = [
    "AccuracyEvaluator",
    "EngineConfig",
    "Evaluator",
    "KNNEvaluator",
    "MIoUEvaluator",
    "DepthEvaluator",
    "MeanEvaluator",
    "TrainState",
    "all_gather_with_grad",
    "ema_decay_at",
    "ema_update",
    "LRSchedule",
    "ModelEma",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "Objective",
    "OptimConfig",
    "ScheduleConfig",
    "StepContext",
    "Trainer",
    "build_optimizer",
    "find_latest",
    "get_rng_state",
    "init_distributed",
    "load_checkpoint",
    "lr_at",
    "param_groups",
    "save_best",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]
