"""Multi-head self-attention on the fused SDPA kernel, with a manual path for capture."""

from __future__ import annotations

import torch
from torch import nn

from .capture import attend
from .rope import apply_rope

# (sin, cos) RoPE tables for the patch tokens, or None.
Rope = tuple[torch.Tensor, torch.Tensor] | None


class AttentionCore(nn.Module):
    """The softmax(QK^T + bias) V step shared by every vitkit attention layer.

    The default path is ``F.scaled_dot_product_attention`` (flash / memory-efficient
    kernels). When a capture sink is attached (see :mod:`vitkit.layers.capture`) the layer
    also forms the explicit softmax(QK^T) weights and hands them over; its output stays the
    fused kernel's. Detaching the sink switches back, so capture never slows normal inference.
    ``attn_bias`` is added to the logits on both paths (broadcastable to (B, heads, N, M);
    -inf removes a key). Pass None, not zeros, when there is none: a mask keeps GPU SDPA off
    the flash kernel. Subclasses (window, spatial-reduction, cosine attention) compute q, k, v
    their own way and call :meth:`attend`.
    """

    def __init__(self, attn_drop: float = 0.0):
        super().__init__()
        self.attn_drop_p = attn_drop
        self.captured: list[torch.Tensor] | None = None

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        scale: float | None = None,
        layout=None,
    ) -> torch.Tensor:
        """q: (B, heads, N, hd), k, v: (B, heads, M, hd) -> (B, heads, N, hd). scale defaults to hd^-0.5;
        ``layout`` (a :class:`~vitkit.layers.capture.WindowLayout`) places windowed maps in the image."""
        dropout_p = self.attn_drop_p if self.training else 0.0
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)  # SDPA wants the mask in the query's dtype (autocast)
        return attend(q, k, v, self.captured, attn_bias, dropout_p, layout=layout, scale=scale)


class Attention(AttentionCore):
    """Multi-head self-attention with one qkv projection (the fused / capture paths: :class:`AttentionCore`)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        proj_bias: bool = True,
    ):
        super().__init__(attn_drop)
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        # Token reduction (vitkit.efficient) reads the queries and keys each forward used.
        self.keep_qk = False
        self.last_qk: tuple[torch.Tensor, torch.Tensor] | None = None

    def project(self, x: torch.Tensor, rope: Rope = None, num_prefix_tokens: int = 0) -> tuple[torch.Tensor, ...]:
        """(B, N, C) -> q, k, v, each (B, heads, N, head_dim), normed and rotated as attention uses them."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rope(q, *rope, num_prefix_tokens=num_prefix_tokens)
            k = apply_rope(k, *rope, num_prefix_tokens=num_prefix_tokens)
        if self.keep_qk:
            self.last_qk = (q, k)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: Rope = None, num_prefix_tokens: int = 0,
                attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.project(x, rope, num_prefix_tokens)
        x = self.mix(q, k, v, attn_bias)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, heads * head_dim)
        return self.proj_drop(self.proj(x))

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        """(B, heads, N, head_dim) q, k, v -> the attended values; the one step other attention kinds replace."""
        return self.attend(q, k, v, attn_bias)
