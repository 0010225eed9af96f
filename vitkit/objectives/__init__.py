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

# Self-supervised objectives: registering them is importing them.
from .mae import MAE, MAEConfig  # noqa: E402  isort: skip
from .dino import DINO, DINOConfig  # noqa: E402  isort: skip
from .ibot import IBOT, IBOTConfig  # noqa: E402  isort: skip
from .simclr import SimCLR, SimCLRConfig  # noqa: E402  isort: skip
from .mocov3 import MoCoV3, MoCoV3Config  # noqa: E402  isort: skip

# Dense objectives (segmentation, depth).
from .dense import Depth, DepthConfig, Segment, SegmentConfig  # noqa: E402  isort: skip

# Object detection (any registered detector).
from .detect import Detect, DetectConfig  # noqa: E402  isort: skip
from .vlm import PerplexityEvaluator, VlmConnector, VlmConnectorConfig  # noqa: E402, F401  isort: skip

# Image-text two-tower models (CLIP, SigLIP).
from .clip import Clip, ClipConfig, Siglip, SiglipConfig  # noqa: E402, F401  isort: skip

# Promptable segmentation (SAM).
from .sam import Sam, SamConfig  # noqa: E402, F401  isort: skip

# Image generation: a VQ tokenizer, then MaskGIT, VAR or DiT (the judge scores their samples).
from .vqvae import VQVAE, VQVAEConfig  # noqa: E402, F401  isort: skip
from .maskgit import MaskGITConfig, MaskGITObjective  # noqa: E402, F401  isort: skip
from .var import VARConfig, VARObjective  # noqa: E402, F401  isort: skip
from .dit import DiTConfig, DiTObjective  # noqa: E402, F401  isort: skip

__all__ = [
    "DINO",
    "Depth",
    "DepthConfig",
    "Detect",
    "DetectConfig",
    "DINOConfig",
    "IBOT",
    "IBOTConfig",
    "MAE",
    "MAEConfig",
    "MoCoV3",
    "MoCoV3Config",
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
    "Segment",
    "SegmentConfig",
    "SimCLR",
    "SimCLRConfig",
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
