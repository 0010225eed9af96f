"""Image-text two-tower models: CLIP and SigLIP built from vitkit image towers and
:mod:`vitkit.text` text towers, their registry, and converters from transformers checkpoints."""

from .convert_hf import convert_hf_clip, convert_hf_siglip
from .convert_open_clip import convert_open_clip, is_open_clip
from .load import load_clip_weights
from .model import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, TwoTower, build_two_tower
from .registry import (
    clip_model_args,
    create_clip,
    is_clip_weights,
    list_clip_models,
    load_clip,
    read_clip_args,
    register_clip,
)
from .retrieval import RetrievalEvaluator, retrieval_metrics
from .zeroshot import TEMPLATES, ZeroShotEvaluator, zeroshot_classifier, zeroshot_predict

__all__ = [
    "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "SIGLIP_MEAN", "SIGLIP_STD", "TwoTower", "build_two_tower",
    "clip_model_args", "convert_hf_clip", "convert_hf_siglip", "create_clip", "is_clip_weights", "list_clip_models",
    "load_clip", "read_clip_args", "register_clip", "RetrievalEvaluator", "retrieval_metrics", "TEMPLATES",
    "ZeroShotEvaluator", "zeroshot_classifier", "zeroshot_predict", "convert_open_clip", "is_open_clip",
    "load_clip_weights",
]
