"""Training objectives: what a run optimises (see :class:`Objective`), registered by name."""

from .base import Objective, StepContext
from .registry import (
    build_objective,
    describe_objectives,
    list_objectives,
    objective_config,
    objective_keys,
    register_objective,
)
from .supervised import Supervised, SupervisedConfig, topk_correct

__all__ = [
    "Objective",
    "StepContext",
    "Supervised",
    "SupervisedConfig",
    "build_objective",
    "describe_objectives",
    "list_objectives",
    "objective_config",
    "objective_keys",
    "register_objective",
    "topk_correct",
]
