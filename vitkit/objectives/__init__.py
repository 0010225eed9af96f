"""Training objectives: what a run optimises (see :class:`Objective`), registered by name."""

from .base import Objective, StepContext
from .deit import DeiT, DeiTConfig
from .distill import DistillConfig, TeacherObjective, kd_term
from .feature_kd import FeatureKD, FeatureKDConfig
from .kd import KD, KDConfig
from .registry import (
    build_objective,
    describe_objectives,
    list_objectives,
    objective_config,
    objective_keys,
    register_objective,
)
from .supervised import Supervised, SupervisedConfig, topk_correct
from .teacher import Teacher, TeacherInput, load_teacher, weights_sha256

__all__ = [
    "KD",
    "DeiT",
    "DeiTConfig",
    "DistillConfig",
    "FeatureKD",
    "FeatureKDConfig",
    "KDConfig",
    "Teacher",
    "TeacherInput",
    "TeacherObjective",
    "kd_term",
    "load_teacher",
    "weights_sha256",
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
