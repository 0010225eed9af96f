"""What a model learned about space and content, without a class in mind.

- :func:`pos_embed_similarity`: cosine similarity of each patch's position embedding to every
  other's, laid out on the grid (the figure of the ViT paper: a learned embedding shows rows,
  columns and distance).
- :func:`feature_pca`: the first three principal components of the patch features, as RGB
  (the DINOv2 figure: parts of the same kind get the same colour across images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


def pos_embed_similarity(model: nn.Module, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(H', W', H', W'): cosine similarity of the position embedding at (i, j) to that at (k, l).

    Read through the public token path (``embed(x)`` then ``ctx.pos_embed``), at the model's
    own input size, or resampled to ``grid``.
    """
    if not hasattr(model, "embed") or not hasattr(model, "patch_embed"):
        raise ConfigError(f"{type(model).__name__} has no token path (embed) to read position embeddings from")
    in_chans = getattr(model, "in_chans", 3)
    base = model.patch_embed.grid_size
    patch = model.patch_embed.patch_size
    H, W = grid or base
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, H * patch[0], W * patch[1], device=param.device, dtype=param.dtype)
    with torch.no_grad():
        _, ctx = model.embed(x)
    if ctx.pos_embed is None:
        raise ConfigError(
            f"{type(model).__name__} adds no position embedding to the tokens "
            f"(pos_embed={getattr(model, 'pos_embed_type', 'none')!r}); RoPE and no-position models have none to show"
        )
    pe = ctx.pos_embed[0].detach().float()  # (H'*W', D)
    pe = F.normalize(pe, dim=-1)
    return (pe @ pe.T).reshape(H, W, H, W)


def pca_rgb(features: torch.Tensor, components: int = 3) -> torch.Tensor:
    """(B, L, D) features -> (B, L, components) in [0, 1]: projections on the first principal axes.

    One PCA over every token of the batch, so colours compare across images. Each component
    is min-max scaled over the batch; its sign is fixed so the largest loading is positive.
    """
    B, L, D = features.shape
    X = features.reshape(B * L, D).float()
    X = X - X.mean(dim=0, keepdim=True)
    k = min(components, D, B * L)
    _, _, Vh = torch.linalg.svd(X, full_matrices=False)
    axes = Vh[:k]  # (k, D)
    signs = torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))
    proj = X @ (axes * signs).T  # (B*L, k)
    lo, hi = proj.amin(dim=0), proj.amax(dim=0)
    proj = (proj - lo) / (hi - lo).clamp_min(1e-12)
    if k < components:
        proj = torch.cat([proj, proj.new_zeros(B * L, components - k)], dim=1)
    return proj.reshape(B, L, components)


def feature_pca(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, H', W', 3) RGB in [0, 1] from the first three components of the last patch features."""
    with torch.no_grad():
        feats = model.forward_features(images)  # (B, N, D)
    npt = int(getattr(model, "num_prefix_tokens", 0))
    H, W = model.patch_embed.dynamic_grid(images.shape[2], images.shape[3])
    rgb = pca_rgb(feats[:, npt:])
    return rgb.reshape(images.shape[0], H, W, 3)
