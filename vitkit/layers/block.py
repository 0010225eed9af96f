"""Transformer block assembled from injected attention, MLP and norm constructors."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .attention import Attention, Rope
from .drop import DropPath
from .layer_scale import LayerScale
from .mlp import Mlp

_LayerNormEps6 = partial(nn.LayerNorm, eps=1e-6)


class Block(nn.Module):
    """Pre-norm (default) or post-norm transformer block.

    pre-norm:  x = x + drop_path(ls1(attn(norm1(x))));  x = x + drop_path(ls2(mlp(norm2(x))))
    post-norm: x = norm1(x + drop_path(ls1(attn(x))));  x = norm2(x + drop_path(ls2(mlp(x))))
    A disabled LayerScale or DropPath is an ``nn.Identity``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = _LayerNormEps6,
        mlp_layer: type[nn.Module] = Mlp,
        attn_layer: type[nn.Module] = Attention,
        post_norm: bool = False,
    ):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
            attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer,
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Rope = None, num_prefix_tokens: int = 0,
                attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D). rope: (sin, cos) for the N - prefix patch tokens; attn_bias: additive,
        broadcastable to (B, heads, N, N)."""
        return self.forward_mlp(self.forward_attn(x, rope, num_prefix_tokens, attn_bias))

    # The two halves are public so that token reduction (vitkit.efficient) can act between them.
    def forward_attn(self, x: torch.Tensor, rope: Rope = None, num_prefix_tokens: int = 0,
                     attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The attention residual (and norm1 when post-norm)."""
        if self.post_norm:
            return self.norm1(x + self.drop_path1(self.ls1(self.attn(x, rope, num_prefix_tokens, attn_bias))))
        return x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rope, num_prefix_tokens, attn_bias)))

    def forward_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP residual (and norm2 when post-norm)."""
        if self.post_norm:
            return self.norm2(x + self.drop_path2(self.ls2(self.mlp(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
