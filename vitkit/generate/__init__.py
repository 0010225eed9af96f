"""Image generation: a VQ tokenizer, MaskGIT, VAR and DiT, built by name.

``create_generator("maskgit_nano", codebook_size=512, grid=7, num_classes=10)`` builds a model;
``list_generators(kind)`` lists the registered variants. A model family registers its variants
when its module is imported.
"""

from .registry import KINDS, create_generator, generator_kind, list_generators, register_generator

__all__ = ["KINDS", "create_generator", "generator_kind", "list_generators", "register_generator"]
