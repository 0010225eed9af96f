"""Model families, registered by variant name."""

# Importing a family's module registers its variants.
from . import cait, convit, convnext, mixer, pvt, resnet, swin, vit, vit_hybrid  # noqa: F401
from ._builder import create_model
from ._registry import ModelCard, get_model_card, list_models, register_model
from .efficientformer import EfficientFormer  # noqa: F401  (registers EfficientFormer)
from .levit import Levit  # noqa: F401  (registers LeViT)
from .mobilevit import MobileVit  # noqa: F401  (registers MobileViT)
from .vim import VisionMamba  # noqa: F401  (registers Vision Mamba)
from .vit import VisionTransformer

__all__ = ["ModelCard", "VisionTransformer", "create_model", "get_model_card", "list_models", "register_model"]
