"""Model families, registered by variant name."""

# Importing a family's module registers its variants.
from . import cait, convit, convnext, mixer, pvt, resnet, swin, vit, vit_hybrid  # noqa: F401
from ._builder import create_model
from ._registry import ModelCard, get_model_card, list_models, register_model
from .vit import VisionTransformer

__all__ = ["ModelCard", "VisionTransformer", "create_model", "get_model_card", "list_models", "register_model"]
