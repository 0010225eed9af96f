"""vitkit: vision transformers in PyTorch."""

from .errors import VitkitError
from .models import ModelCard, VisionTransformer, create_model, get_model_card, list_models

__version__ = "0.1.0"


def load_weights(model, source, **kwargs):
    """Load a checkpoint (safetensors, .pth/.bin, state dict, HF folder or hub id) into ``model``."""
    from .convert.weights import load_weights as _load

    return _load(model, source, **kwargs)


def save_weights(model, path, **kwargs):
    """Write ``model`` as safetensors with its config, so ``create_model(path)`` rebuilds it."""
    from .convert.weights import save_weights as _save

    return _save(model, path, **kwargs)


__all__ = [
    "ModelCard", "VisionTransformer", "VitkitError", "create_model", "get_model_card", "list_models", "load_weights",
    "save_weights", "__version__",
]
