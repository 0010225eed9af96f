"""Look inside a vision transformer: attention capture, rollout, per-head maps, structure, plots.

>>> from vitkit.interpret import capture_attention, attention_rollout
>>> maps = capture_attention(model, images)           # one (B, heads, N, N) per layer
>>> rollout = attention_rollout(maps, head_fusion="mean", discard_ratio=0.9)
"""

from .capture import AttentionMaps, attention_capture, capture_attention, patch_grid, windows_to_image
from .explain import DEFAULT_METHODS, METHODS, explain, render
from .heads import head_maps, last_layer_head_maps, top_mass_mask
from .rollout import (
    HEAD_FUSIONS,
    attention_rollout,
    fuse_heads,
    gradient_rollout,
    readout_rows,
    rollout_fused,
    rollout_map,
    token_map,
)
from .structure import feature_pca, pca_rgb, pos_embed_similarity

__all__ = [
    "DEFAULT_METHODS", "HEAD_FUSIONS", "METHODS", "AttentionMaps", "attention_capture", "attention_rollout",
    "capture_attention", "explain", "feature_pca", "fuse_heads", "gradient_rollout", "head_maps",
    "last_layer_head_maps", "patch_grid", "pca_rgb", "pos_embed_similarity", "readout_rows", "render",
    "rollout_fused", "rollout_map", "token_map", "top_mass_mask", "windows_to_image",
]
