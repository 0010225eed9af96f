"""Model families, registered by variant name, each on the one :class:`Backbone` base."""

# Importing a family's module registers its variants.
from . import (  # noqa: F401
    cait,
    convit,
    convnext,
    efficientformer,
    levit,
    mixer,
    mobilevit,
    pvt,
    resnet,
    swin,
    vim,
    vit,
    vit_hybrid,
    vitdet,
)
from ._base import Backbone, ClassifierHead
from ._builder import create_model
from ._registry import ModelCard, get_model_card, list_models, register_family, register_model
from .vit import VisionTransformer

__all__ = [
    "Backbone", "ClassifierHead", "ModelCard", "VisionTransformer", "create_model", "get_model_card", "list_models",
    "register_family", "register_model",
]
