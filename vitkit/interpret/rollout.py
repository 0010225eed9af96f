"""Attention rollout and its gradient-weighted form, and the token-to-patch maps they give.

Rollout (Abnar & Zuidema, 2020) follows information through the residual stream: each
layer's head-fused attention A becomes 0.5 A + 0.5 I (the skip connection), rows are
renormalised, and the layers multiply, last on the left: R = Â_L ... Â_1. Row r of R says
how much token r's final state draws on each input token.

Gradient-weighted rollout (Chefer et al., 2021) fuses the heads as mean_h(max(0, dy/dA * A)),
weighting each head by how much it moves the chosen class score ``y``; each fused row is then
renormalised to sum to 1, so the gradients' scale does not decide how much the identity weighs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .capture import AttentionMaps, attention_capture, capture_attention

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(attn: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """(B, heads, N, N) -> (B, N, N) by the mean, max or min over heads."""
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    if head_fusion == "min":
        return attn.amin(dim=1)
    raise ConfigError(f"head_fusion {head_fusion!r} must be one of {HEAD_FUSIONS}")


def _discard(a: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest ``ratio`` of each image's weights (B, N, N); each image on its own."""
    if ratio <= 0:
        return a
    if ratio >= 1:
        raise ConfigError(f"discard_ratio must be in [0, 1), got {ratio}")
    B = a.shape[0]
    flat = a.reshape(B, -1)  # (B, N*N)
    k = int(flat.shape[1] * ratio)
    if k == 0:
        return a
    low = flat.topk(k, dim=1, largest=False).indices
    return flat.scatter(1, low, 0.0).reshape(a.shape)


def rollout_fused(fused: Sequence[torch.Tensor], discard_ratio: float = 0.0) -> torch.Tensor:
    """Roll out already head-fused (B, N, N) maps, first layer first -> (B, N, N)."""
    if not fused:
        raise ConfigError("rollout needs at least one attention map")
    B, N, _ = fused[0].shape
    eye = torch.eye(N, dtype=fused[0].dtype, device=fused[0].device)
    result = eye.expand(B, N, N)
    for a in fused:
        a = 0.5 * _discard(a, discard_ratio) + 0.5 * eye  # the residual connection
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result


def attention_rollout(
    maps: Sequence[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Rollout of per-layer (B, heads, N, N) maps, first layer first -> (B, N, N), rows summing to 1.

    discard_ratio: the fraction of each image's lowest fused weights set to zero before
    adding the identity (a denoiser; 0 keeps all).
    """
    return rollout_fused([fuse_heads(a.float(), head_fusion) for a in maps], discard_ratio)


def gradient_rollout(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    discard_ratio: float = 0.0,
    layers: int | Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient-weighted rollout for class ``target`` (default: each image's top class).

    Returns ``(rollout (B, N, N), logits (B, classes))``. Works with gradient checkpointing
    on: the backward runs inside the capture, and the recomputed layers are not captured twice.
    """
    B = images.shape[0]
    with attention_capture(model, layers, keep_graph=True) as maps, torch.enable_grad():
        logits = model(images)
        if isinstance(logits, tuple):
            logits = sum(logits) / len(logits)
        if logits.ndim != 2:
            raise ConfigError(
                f"gradient rollout needs class logits (B, classes); the model returns {tuple(logits.shape)} "
                "(a model without a classifier head has no class to explain: use attention rollout)"
            )
        if target is None:
            target = logits.argmax(dim=-1)
        target = torch.as_tensor(target, device=logits.device).reshape(-1).expand(B)
        if int(target.min()) < 0 or int(target.max()) >= logits.shape[1]:
            raise ConfigError(f"class {target.tolist()} out of range for a model with {logits.shape[1]} classes")
        # Images do not interact in eval mode, so one backward gives each image its own gradient.
        score = logits.gather(1, target[:, None]).sum()
        grads = torch.autograd.grad(score, list(maps))
    fused = [(g * a).clamp(min=0).mean(dim=1).detach().float() for g, a in zip(grads, maps)]
    # Gradients are tiny next to the residual identity: scaled as they are, every row of the
    # rollout would stay the identity. Each row is made a distribution (an all-zero row, with
    # no positive evidence, keeps only the residual).
    fused = [f / f.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(f.dtype).tiny) for f in fused]
    return rollout_fused(fused, discard_ratio), logits.detach()


def readout_rows(model: nn.Module) -> list[int] | None:
    """The token rows whose rollout explains the prediction: the class token (and the
    distillation token for a distilled model), or None for the mean over patch tokens (models
    that pool by averaging, or have no class token)."""
    pool = getattr(model, "global_pool", "token")
    if pool == "avg" or not getattr(model, "has_class_token", int(getattr(model, "num_prefix_tokens", 0)) > 0):
        return None
    return [0, 1] if getattr(model, "distilled", False) else [0]


def token_map(
    matrix: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int], rows: list[int] | None = None
) -> torch.Tensor:
    """(B, N, N) rollout or attention -> (B, H', W') weight of each patch, summing to 1.

    rows: the query rows to read (averaged); None averages the patch rows.
    """
    B, N, _ = matrix.shape
    H, W = grid
    if N != num_prefix_tokens + H * W:
        raise ConfigError(f"{N} tokens do not match {num_prefix_tokens} prefix tokens + a {H}x{W} grid")
    picked = matrix[:, rows] if rows is not None else matrix[:, num_prefix_tokens:]
    patch = picked.mean(dim=1)[:, num_prefix_tokens:]  # (B, H'*W')
    patch = patch / patch.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return patch.reshape(B, H, W)


def rollout_map(
    model: nn.Module,
    images: torch.Tensor,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    layers: int | Sequence[int] | None = None,
) -> tuple[torch.Tensor, AttentionMaps]:
    """The attention-rollout map of each image, (B, H', W') summing to 1, and the capture."""
    maps = capture_attention(model, images, layers)
    R = attention_rollout(maps, head_fusion, discard_ratio)
    return token_map(R, maps.num_prefix_tokens, maps.grid, readout_rows(model)), maps
