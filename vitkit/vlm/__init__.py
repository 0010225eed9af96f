"""Vision-language models: a LLaVA-style connector from a vitkit image encoder into a Hugging Face causal LM."""

from .connector import (
    IGNORE_INDEX,
    Projector,
    VisionLanguageModel,
    caption_nll,
    caption_perplexity,
    feature_dim,
    image_features,
    tokenize_captions,
)

__all__ = [
    "IGNORE_INDEX",
    "Projector",
    "VisionLanguageModel",
    "caption_nll",
    "caption_perplexity",
    "feature_dim",
    "image_features",
    "tokenize_captions",
]
