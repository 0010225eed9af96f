"""Token pruning by class-token attention (EViT, Liang et al., ICLR 2022).

At chosen blocks, between attention and MLP, the patch tokens that the class token attends to
most are kept (a ``keep_rate`` share) and the rest are fused into one token, their average
weighted by that attention. Prefix tokens always stay. The fused token's size is the number of
tokens it replaced, so average pooling weighs it accordingly; attention stays plain softmax
unless ``proportional=True``.

>>> apply_token_pruning(model, keep_rate=0.7)            # at 1/4, 1/2 and 3/4 of the depth
>>> apply_token_pruning(model, keep_rate=0.5, layers=[3, 6, 9])
>>> remove_token_pruning(model)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from ..errors import ConfigError
from .reduce import apply_reduction, remove_reduction


def class_attention(q: torch.Tensor, k: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of the first (class) query over all keys, averaged over heads: (B, N).

    q, k: (B, heads, N, head_dim); attn_bias broadcastable to (B, heads, N, N) or None.
    """
    logits = (q[:, :, :1].float() * q.shape[-1] ** -0.5) @ k.float().transpose(-2, -1)  # (B, heads, 1, N)
    if attn_bias is not None:
        logits = logits + attn_bias[..., :1, :].float()
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def prune_tokens(
    x: torch.Tensor, sizes: torch.Tensor, scores: torch.Tensor, keep_rate: float, num_protected: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ceil(keep_rate * L) patch tokens with the highest ``scores`` and fuse the rest into one.

    x: (B, N, D); sizes, scores: (B, N). The first ``num_protected`` tokens stay; kept tokens keep
    their order; the fused token (score-weighted average, size = sum of sizes) comes last. Returns
    (B, num_protected + K + 1, D) and the sizes; unchanged when nothing would be dropped.
    """
    B, N, D = x.shape
    p = num_protected
    L = N - p
    k = math.ceil(keep_rate * L)
    if k >= L:
        return x, sizes
    with torch.no_grad():
        keep = scores[:, p:].topk(k, dim=-1).indices.sort(dim=-1).values  # (B, K) in sequence order
        dropped = torch.ones_like(scores[:, p:], dtype=torch.bool).scatter(1, keep, False)  # (B, L)
    patches, patch_sizes = x[:, p:], sizes[:, p:]
    kept = patches.gather(1, keep[..., None].expand(-1, -1, D))  # (B, K, D)
    w = (scores[:, p:] * dropped).to(x.dtype)[..., None]  # (B, L, 1) attention of the dropped tokens
    fused = (w * patches).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1e-12)  # (B, 1, D)
    fused_size = (patch_sizes * dropped).sum(dim=1, keepdim=True)  # (B, 1)
    x = torch.cat([x[:, :p], kept, fused], dim=1)
    sizes = torch.cat([sizes[:, :p], patch_sizes.gather(1, keep), fused_size], dim=1)
    return x, sizes


def _prune_layer(x, sizes, q, k, num_prefix_tokens, attn_bias, *, keep_rate: float):
    return prune_tokens(x, sizes, class_attention(q, k, attn_bias), keep_rate, num_prefix_tokens)


def default_prune_layers(depth: int) -> list[int]:
    """Blocks at 1/4, 1/2 and 3/4 of the depth (3, 6, 9 for 12 blocks)."""
    return sorted({max(int(depth * f), 0) for f in (0.25, 0.5, 0.75)})


def apply_token_pruning(
    model: nn.Module, keep_rate: float = 0.7, layers: Sequence[int] | None = None, proportional: bool = False
) -> nn.Module:
    """Patch ``model`` in place to prune patch tokens at ``layers`` (block indices), keeping ``keep_rate``.

    Needs a class token (its attention ranks the tokens). Returns the model.
    """
    if not 0.0 < keep_rate <= 1.0:
        raise ConfigError(f"keep_rate must be in (0, 1], got {keep_rate}")
    if getattr(model, "cls_token", None) is None:
        raise ConfigError(
            "token pruning ranks patch tokens by the class token's attention, and this model has no class token; "
            "use token merging (apply_tome) instead"
        )
    depth = len(getattr(model, "blocks", ()))
    layers = default_prune_layers(depth) if layers is None else [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ConfigError(f"pruning layers {bad} are out of range for a model with {depth} blocks")
    reducers = [partial(_prune_layer, keep_rate=keep_rate) if i in layers else None for i in range(depth)]
    apply_reduction(
        model, reducers, kind="token pruning", proportional=proportional,
        settings={"keep_rate": keep_rate, "layers": layers},
    )
    return model


remove_token_pruning = remove_reduction
