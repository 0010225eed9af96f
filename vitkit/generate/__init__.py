"""Image generation: a VQ tokenizer, MaskGIT, VAR and DiT, built by name, with their samplers and metrics.

``create_generator("maskgit_nano", codebook_size=512, grid=7, num_classes=10)`` builds a model;
``list_generators(kind)`` lists the registered variants (each family registers its own when its
module is imported, as this package does). ``load_tokenizer`` / ``load_generator`` read runs and
weights files; ``save_grid`` writes sample grids; ``frechet_distance`` and ``class_consistency``
score samples.
"""

from .registry import KINDS, create_generator, generator_kind, list_generators, register_generator

# The model families: importing them registers their variants.
from .tokenizer import VQTokenizer  # noqa: E402  isort: skip
from .maskgit import MaskGIT, cosine_schedule, maskgit_sample  # noqa: E402  isort: skip
from .var import VAR, block_causal_mask, var_sample  # noqa: E402  isort: skip
from .dit import DiT, DiTBlock, flow_sample, rectified_flow_loss  # noqa: E402  isort: skip
from .grid import save_grid  # noqa: E402  isort: skip
from .metrics import class_consistency, feature_stats, frechet_distance  # noqa: E402  isort: skip
from .load import generative_kind, load_generator, load_tokenizer  # noqa: E402  isort: skip

__all__ = [
    "KINDS", "VAR", "DiT", "DiTBlock", "MaskGIT", "VQTokenizer", "block_causal_mask", "class_consistency",
    "cosine_schedule", "create_generator", "feature_stats", "flow_sample", "frechet_distance", "generative_kind",
    "generator_kind", "list_generators", "load_generator", "load_tokenizer", "maskgit_sample", "rectified_flow_loss",
    "register_generator", "save_grid", "var_sample",
]
