"""vitkit: vision transformers in PyTorch."""

from ._version import __version__
from .convert.weights import load_weights
from .errors import VitkitError
from .models import ModelCard, VisionTransformer, create_model, get_model_card, list_models
from .source import LoadedModel, load_model
from .weights_io import save_weights

__all__ = [
    "LoadedModel", "ModelCard", "VisionTransformer", "VitkitError", "create_model", "get_model_card", "list_models",
    "load_model", "load_weights", "save_weights", "__version__",
]
