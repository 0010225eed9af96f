"""Multi-head attention pooling (MAP): learned latent queries attend over the tokens.

The pooling head of SigLIP's image tower (big_vision's ``MAPHead``), in timm's
``AttentionPoolLatent`` layout so timm, open_clip (timm trunk) and transformers checkpoints
map onto it: ``latent`` (1, latent_len, D), ``q``, ``kv`` (keys then values), ``proj``, then a
pre-norm MLP residual ``x + mlp(norm(x))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import Mlp


class AttentionPoolLatent(nn.Module):
    """(B, N, D) tokens -> (B, D) (``pool="token"``: the first latent; ``"avg"``: their mean; ``""``: all).

    ``forward(x, attn_mask=None)``: an additive or boolean mask broadcastable to
    (B, heads, latent_len, N) leaves keys out (padding of packed variable-length inputs).
    The attention runs on the fused kernel and is not part of attention capture: its maps are
    latent-to-token, not token-to-token.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        latent_len: int = 1,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        pool: str = "token",
        drop: float = 0.0,
    ):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"attention pool width {dim} is not divisible by num_heads {num_heads}")
        if pool not in ("token", "avg", ""):
            raise ValueError(f"attention pool pool={pool!r} must be 'token', 'avg' or ''")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent_len = latent_len
        self.pool = pool
        self.latent = nn.Parameter(torch.zeros(1, latent_len, dim))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.norm = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.init_weights()

    def init_weights(self) -> None:
        # big_vision draws the probe with std 1/sqrt(D), truncated at two standard deviations.
        std = self.latent.shape[-1] ** -0.5
        nn.init.trunc_normal_(self.latent, std=std, a=-2 * std, b=2 * std)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        # The query is the same for every image: projected once, then broadcast over the batch.
        q = self.q(self.latent).reshape(1, self.latent_len, h, d).transpose(1, 2).expand(B, -1, -1, -1)
        k, v = self.kv(x).reshape(B, N, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, self.latent_len, C)))
        x = x + self.mlp(self.norm(x))
        if self.pool == "token":
            return x[:, 0]
        if self.pool == "avg":
            return x.mean(1)
        return x


__all__ = ["AttentionPoolLatent"]
