"""Text towers and tokenizers for vision-language models (CLIP, SigLIP).

``TextTransformer`` encodes token ids into one embedding per text; the tokenizers turn captions
into those ids: ``ClipTokenizer`` (OpenAI CLIP's BPE), ``SentencePieceTokenizer`` (SigLIP's),
``train_caption_tokenizer`` (a byte-level BPE trained on your captions). ``load_tokenizer``
rebuilds any of them from its ``to_config()`` dict or a saved folder.
"""

from .tokenizer import (
    CaptionBpeTokenizer,
    ClipTokenizer,
    SentencePieceTokenizer,
    TextTokenizer,
    find_clip_vocab,
    load_tokenizer,
    train_caption_tokenizer,
)
from .transformer import TextTransformer

__all__ = [
    "CaptionBpeTokenizer", "ClipTokenizer", "SentencePieceTokenizer", "TextTokenizer", "TextTransformer",
    "find_clip_vocab", "load_tokenizer", "train_caption_tokenizer",
]
