"""Linear attention: softmax replaced by a kernel feature map, O(N) in tokens (Katharopoulos et al., 2020).

Attention with a feature map phi is
    out_i = phi(q_i) . sum_j w_j phi(k_j) v_j^T  /  phi(q_i) . sum_j w_j phi(k_j),
computed right to left, so no N x N matrix exists. The key weights w_j come from an attention
bias that depends on the key only (log sizes of merged tokens, -inf for a removed key); a bias
that differs per query pair has no linear form and is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .attention import Attention


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1: positive, so every normaliser stays > 0."""
    return F.elu(x) + 1.0


def linear_attention(
    q_feat: torch.Tensor, k_feat: torch.Tensor, v: torch.Tensor, key_weights: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """q_feat, k_feat: (B, heads, N, F) non-negative features; v: (B, heads, N, head_dim);
    key_weights: broadcastable to (B, heads, N) or None. Returns (B, heads, N, head_dim)."""
    if key_weights is not None:
        k_feat = k_feat * key_weights[..., None]
    kv = torch.einsum("bhnf,bhnd->bhfd", k_feat, v)  # (B, heads, F, head_dim)
    norm = torch.einsum("bhnf,bhf->bhn", q_feat, k_feat.sum(dim=2))  # (B, heads, N)
    return torch.einsum("bhnf,bhfd->bhnd", q_feat, kv) / (norm[..., None] + eps)


def key_weights_from_bias(attn_bias: torch.Tensor | None) -> torch.Tensor | None:
    """An additive bias broadcastable to (B, heads, 1, N) -> multiplicative key weights (B|1, heads|1, N)."""
    if attn_bias is None:
        return None
    if attn_bias.ndim < 2 or attn_bias.shape[-2] != 1:
        raise ConfigError(
            f"linear attention takes only a per-key attention bias (shape (..., 1, N)), got {tuple(attn_bias.shape)}: "
            "relative position biases and per-query masks need softmax attention (attn_type='softmax')"
        )
    w = attn_bias.float().exp()
    return w.reshape((1,) * (4 - w.ndim) + tuple(w.shape))[:, :, 0]


class LinearAttention(Attention):
    """Multi-head attention with a kernel feature map instead of softmax; a drop-in for ``Attention``.

    Same parameters (``qkv``, ``proj``, optional q/k norms), constructor and call signature as
    ``Attention``. ``attn_drop`` has no attention matrix to drop from, and there are no attention
    maps to capture.
    """

    def features(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        """(B, heads, N, head_dim) -> (B, heads, N, F) non-negative features."""
        return elu_feature_map(x)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        if self.captured is not None:
            raise ConfigError("attention maps exist only for softmax attention; this model uses attn_type='linear'")
        weights = key_weights_from_bias(attn_bias)
        # Sums over N in low precision lose the normaliser: the kernel runs in float32.
        x = linear_attention(self.features(q.float(), True), self.features(k.float(), False), v.float(), weights)
        return x.to(v.dtype)
