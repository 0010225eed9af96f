"""Model families, registered by variant name."""

from . import pvt, swin, vit  # noqa: F401  (register the PVT v2, Swin and ViT/DeiT variants)
from ._builder import create_model
from ._registry import ModelCard, get_model_card, list_models, register_model
from .vit import VisionTransformer

__all__ = ["ModelCard", "VisionTransformer", "create_model", "get_model_card", "list_models", "register_model"]
