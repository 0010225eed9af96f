"""Performer attention: FAVOR+ positive orthogonal random features (Choromanski et al., ICLR 2021).

exp(q . k / sqrt(d)) = E_w[phi(q) . phi(k)] with phi(x) = exp(w . x' - |x'|^2 / 2) / sqrt(m),
x' = x / d^(1/4) and w ~ N(0, I); m orthogonal draws make the estimate unbiased with low variance,
so linear attention on phi approximates softmax attention, closer as m grows.
"""

from __future__ import annotations

import math

import torch

from .linear_attention import LinearAttention


def orthogonal_random_features(num_features: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(num_features, dim) rows: blocks of orthogonal directions, each row with a chi(dim) length like a Gaussian's."""
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        blocks.append(q.T)  # rows orthonormal
    w = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator).norm(dim=1, keepdim=True)
    return w * norms


def favor_features(x: torch.Tensor, proj: torch.Tensor, is_query: bool) -> torch.Tensor:
    """(..., N, d) -> (..., N, m) positive random features of x for the softmax kernel.

    A stabiliser is subtracted inside the exp: per query row for queries, one value per head for
    keys; both cancel in the attention normaliser, so the result is unchanged.
    """
    d = x.shape[-1]
    x = x * d**-0.25
    proj_x = x @ proj.to(x.dtype).T  # (..., N, m)
    sq = (x * x).sum(dim=-1, keepdim=True) / 2
    if is_query:
        stab = proj_x.amax(dim=-1, keepdim=True)
    else:
        stab = proj_x.amax(dim=(-2, -1), keepdim=True)
    return torch.exp(proj_x - sq - stab.detach()) / math.sqrt(proj.shape[0]) + 1e-6


class PerformerAttention(LinearAttention):
    """FAVOR+ attention, a drop-in for ``Attention``.

    ``num_features`` random features per head (default head_dim * ln(head_dim)); the projection is
    a saved buffer, so a checkpoint reloads the same features. ``redraw_features()`` draws new ones.
    """

    def __init__(self, dim: int, num_heads: int = 8, *args, num_features: int | None = None, **kwargs):
        super().__init__(dim, num_heads, *args, **kwargs)
        d = self.head_dim
        self.num_features = num_features or max(int(d * math.log(d)), 1)
        self.register_buffer("feature_proj", orthogonal_random_features(self.num_features, d))

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        w = orthogonal_random_features(self.num_features, self.head_dim, generator)
        self.feature_proj.copy_(w.to(self.feature_proj))

    def features(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        return favor_features(x, self.feature_proj, is_query)
