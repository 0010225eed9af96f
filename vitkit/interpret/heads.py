"""Per-head attention of the readout token to the patches, and the mask of its top mass.

The maps DINO shows (Caron et al., 2021): in the last layer, each head's attention from the
class token to the patch tokens, one map per head; the mask keeps the smallest set of patches
that holds a fraction ``mass`` of a head's attention.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .capture import capture_attention
from .rollout import readout_rows


def head_maps(
    attn: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int], rows: list[int] | None = None
) -> torch.Tensor:
    """(B, heads, N, N) of one layer -> (B, heads, H', W'): each head's readout-to-patch weights.

    rows: the query rows to read (averaged), default the class token; None averages the
    patch rows (for models without a class token). Each map is renormalised over the patches.
    """
    B, heads, N, _ = attn.shape
    H, W = grid
    picked = attn[:, :, rows] if rows is not None else attn[:, :, num_prefix_tokens:]
    patch = picked.mean(dim=2)[..., num_prefix_tokens:]  # (B, heads, H'*W')
    patch = patch / patch.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return patch.reshape(B, heads, H, W)


def top_mass_mask(maps: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """Bool mask of the largest weights that together hold ``mass`` of each map's total.

    maps: (..., H', W') non-negative. Sorted ascending, a patch is kept once the running sum up
    to it passes ``1 - mass`` of the total, so the kept set holds at least ``mass``.
    """
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    shape = maps.shape
    flat = maps.reshape(-1, shape[-2] * shape[-1]).float()
    flat = flat / flat.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    val, idx = flat.sort(dim=-1)  # ascending
    keep_sorted = val.cumsum(dim=-1) > 1 - mass
    keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
    return keep.reshape(shape)


def last_layer_head_maps(model: nn.Module, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """(B, heads, H', W') readout-to-patch attention of one layer (default the last) per head.

    Deprecated: nothing in vitkit uses it; compose ``capture_attention`` and ``head_maps`` instead.
    """
    warnings.warn(
        "vitkit.interpret.last_layer_head_maps is deprecated and will be removed in the next release: use "
        "head_maps(capture_attention(model, images, layers=[layer])[0], ...) as vitkit.interpret.explain does",
        DeprecationWarning, stacklevel=2,
    )
    maps = capture_attention(model, images, layers=[layer])
    return head_maps(maps[0], maps.num_prefix_tokens, maps.grid, readout_rows(model))
