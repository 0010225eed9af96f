"""Image-text two-tower models: CLIP and SigLIP built from vitkit image towers and
:mod:`vitkit.text` text towers, their registry, and converters from transformers checkpoints."""

from .convert_hf import convert_hf_clip, convert_hf_siglip
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

__all__ = [
    "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "SIGLIP_MEAN", "SIGLIP_STD", "TwoTower", "build_two_tower",
    "clip_model_args", "convert_hf_clip", "convert_hf_siglip", "create_clip", "is_clip_weights", "list_clip_models",
    "load_clip", "read_clip_args", "register_clip",
]
