"""Token merging (ToMe, Bolya et al., ICLR 2023) for vitkit ViT-family models.

Between attention and MLP in each block, bipartite soft matching on the attention keys merges r
patch tokens into their most similar partners by size-weighted average. Attention is then
proportional (log size added to the logits through the attention bias, so it stays on SDPA) and
average pooling weighs tokens by size. Prefix tokens (class, distillation, registers) never merge.

>>> apply_tome(model, r=8)                      # 8 tokens fewer after every block
>>> apply_tome(model, r=8, schedule="decreasing")   # 2r at the first block, down to 0
>>> remove_tome(model)
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .reduce import apply_reduction, remove_reduction

SCHEDULES = ("constant", "decreasing")


def merge_tokens(
    x: torch.Tensor, sizes: torch.Tensor, metric: torch.Tensor, r: int, num_protected: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` tokens of x by bipartite soft matching on ``metric``.

    x: (B, N, D) tokens; sizes: (B, N) how many original tokens each stands for; metric: (B, N, C)
    similarity features (the attention keys). The first ``num_protected`` tokens are left as they
    are. The other L tokens alternate into sets A and B; each A token finds its most similar B
    token (cosine), and the r A tokens with the best matches are averaged into those B tokens,
    weighted by size. r is capped at L // 2. Returns (B, N - r, D) tokens and their sizes: the
    protected tokens, the A tokens that stayed, then the B tokens.
    """
    B, N, D = x.shape
    p = num_protected
    r = min(r, (N - p) // 2)
    if r <= 0:
        return x, sizes
    with torch.no_grad():
        m = F.normalize(metric[:, p:].float(), dim=-1)
        scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)  # (B, La, Lb) cosine, A against B
        best, match = scores.max(dim=-1)  # (B, La)
        order = best.argsort(dim=-1, descending=True)[..., None]  # (B, La, 1) best-matched A first
        src, stay = order[:, :r], order[:, r:]  # (B, r, 1), (B, La - r, 1)
        dst = match[..., None].gather(1, src)  # (B, r, 1) the B token each merged A token joins
    s = sizes[:, p:, None].float()
    # Size-weighted sums and the sizes travel together: (B, L, D + 1).
    t = torch.cat([x[:, p:].float() * s, s], dim=-1)
    ta, tb = t[:, ::2], t[:, 1::2]
    kept = ta.gather(1, stay.expand(-1, -1, D + 1))
    tb = tb.scatter_add(1, dst.expand(-1, -1, D + 1), ta.gather(1, src.expand(-1, -1, D + 1)))
    t = torch.cat([kept, tb], dim=1)  # (B, L - r, D + 1)
    merged = (t[..., :D] / t[..., D:]).to(x.dtype)
    return torch.cat([x[:, :p], merged], dim=1), torch.cat([sizes[:, :p], t[..., D]], dim=1)


def _merge_layer(x, sizes, q, k, num_prefix_tokens, attn_bias, *, r: int):
    return merge_tokens(x, sizes, k.mean(dim=1), r, num_prefix_tokens)  # keys averaged over heads: (B, N, hd)


def tome_schedule(r: int | Sequence[int], depth: int, schedule: str = "constant") -> list[int]:
    """Tokens merged per block: r everywhere, or decreasing linearly from 2r to 0 (about r on average)."""
    if not isinstance(r, int):
        r = [int(v) for v in r]
        if len(r) != depth or min(r) < 0:
            raise ConfigError(f"a per-block r list needs {depth} values >= 0, got {r}")
        return r
    if r < 0:
        raise ConfigError(f"ToMe r must be >= 0 (tokens merged per block), got {r}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"ToMe schedule {schedule!r} must be one of {SCHEDULES}")
    if schedule == "constant" or depth == 1:
        return [r] * depth
    return [round(2 * r * (depth - 1 - i) / (depth - 1)) for i in range(depth)]


def apply_tome(
    model: nn.Module, r: int | Sequence[int] = 8, schedule: str = "constant", proportional: bool = True
) -> nn.Module:
    """Patch ``model`` in place to merge ``r`` tokens per block (an int, or one value per block).

    Works on vitkit models whose ``blocks`` are vitkit Blocks (ViT, DeiT, CaiT's self-attention
    blocks), in eval and in training; the weights and ``state_dict`` are unchanged. Returns the model.
    """
    per_block = tome_schedule(r, len(getattr(model, "blocks", ())) or 1, schedule)
    reducers = [partial(_merge_layer, r=v) if v > 0 else None for v in per_block]
    apply_reduction(model, reducers, kind="ToMe", proportional=proportional, settings={"r": per_block})
    return model


remove_tome = remove_reduction
