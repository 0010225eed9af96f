"""Token merging (ToMe, Bolya et al., ICLR 2023) for vitkit ViT-family models.

Between attention and MLP in each block, bipartite soft matching on the attention keys merges r
patch tokens into their most similar partners by size-weighted average. Attention is then
proportional (log size added to the logits through the attention bias, so it stays on SDPA) and
average pooling weighs tokens by size (as ToMe's MAE patch does). Prefix tokens (class,
distillation, registers) never merge. The matching, the order of the merged sequence and the
per-block schedule follow the reference code (facebookresearch/ToMe: ``bipartite_soft_matching``,
``merge_wavg``, ``parse_r``), so the same tokens merge as there; tests/test_tome_reference.py
restates that code and compares.

>>> apply_tome(model, r=8)                      # 8 tokens fewer after every block
>>> apply_tome(model, r=8, schedule="decreasing")   # 2r at the first block, down to 0
>>> remove_tome(model)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .reduce import apply_reduction, remove_reduction

# ToMe's ``parse_r`` inflection for each named schedule: 0 keeps r in every block, -1 goes from 2r
# at the first block down to 0 (the paper's "decreasing" schedule).
SCHEDULES = {"constant": 0.0, "decreasing": -1.0}


def merge_tokens(
    x: torch.Tensor, sizes: torch.Tensor, metric: torch.Tensor, r: int, num_protected: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` tokens of x by bipartite soft matching on ``metric``, as ToMe's reference code does.

    x: (B, N, D) tokens; sizes: (B, N) how many original tokens each stands for; metric: (B, N, C)
    similarity features (the attention keys). Tokens alternate into sets A (even positions) and B
    (odd positions) over the WHOLE sequence, prefix tokens included, as in ToMe's
    ``bipartite_soft_matching``; the first ``num_protected`` tokens (class, distillation,
    registers) take part in the split but score -inf, so an A one never merges away and a B one
    never receives a token. Each A token finds its most similar B token (cosine), and the r A
    tokens with the best matches are averaged into those B tokens, weighted by size (ToMe's
    ``merge_wavg``). r is capped at (N - num_protected) // 2.

    Returns (B, N - r, D) tokens and their sizes, in the reference's order: the protected tokens as
    they came, the unmerged A tokens (in sequence order when there are protected tokens; in the
    order of their best match, as the reference leaves them, when there are none), then the B
    tokens. The order matters: it sets the A/B split of the next block.

    The sums run in at least float32 (the reference uses x's dtype, which loses the sizes' integer
    precision in bf16); for float32 inputs the arithmetic is the reference's, operation for operation.
    """
    B, N, D = x.shape
    p = num_protected
    r = min(r, (N - p) // 2)
    if r <= 0:
        return x, sizes
    with torch.no_grad():
        m = F.normalize(metric.to(torch.promote_types(metric.dtype, torch.float32)), dim=-1)
        scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)  # (B, ceil(N/2), N // 2) cosine, A against B
        scores[:, :(p + 1) // 2] = -math.inf  # protected A tokens: never merged away
        scores[:, :, :p // 2] = -math.inf  # protected B tokens: never merged into
        best, match = scores.max(dim=-1)  # (B, Na)
        order = best.argsort(dim=-1, descending=True)[..., None]  # (B, Na, 1) best-matched A first
        src, stay = order[:, :r], order[:, r:]  # (B, r, 1), (B, Na - r, 1); protected A (-inf) stay
        if p:
            stay = stay.sort(dim=1).values  # sequence order, so the protected tokens lead
        dst = match[..., None].gather(1, src)  # (B, r, 1) the B token each merged A token joins
    work = torch.promote_types(x.dtype, sizes.dtype)
    s = sizes.to(work)[..., None]
    # Size-weighted sums and the sizes travel together: (B, N, D + 1).
    t = torch.cat([x.to(work) * s, s], dim=-1)
    ta, tb = t[:, ::2], t[:, 1::2]
    kept = ta.gather(1, stay.expand(-1, -1, D + 1))
    tb = tb.scatter_reduce(1, dst.expand(-1, -1, D + 1), ta.gather(1, src.expand(-1, -1, D + 1)), reduce="sum")
    # The protected tokens lead kept (A) and tb (B), unchanged; put them back in their own order.
    t = torch.cat([kept[:, (p + 1) // 2:], tb[:, p // 2:]], dim=1)  # (B, N - p - r, D + 1)
    merged = (t[..., :D] / t[..., D:]).to(x.dtype)
    return torch.cat([x[:, :p], merged], dim=1), torch.cat([sizes[:, :p].to(work), t[..., D]], dim=1)


def _merge_layer(x, sizes, q, k, num_prefix_tokens, attn_bias, *, r: int):
    return merge_tokens(x, sizes, k.mean(dim=1), r, num_prefix_tokens)  # keys averaged over heads: (B, N, hd)


def tome_schedule(r: int | Sequence[int], depth: int, schedule: str | float = "constant") -> list[int]:
    """Tokens merged per block, by ToMe's ``parse_r`` rule.

    ``schedule`` is "constant" (r in every block), "decreasing" (2r at the first block down to 0)
    or a ToMe inflection in [-1, 1] (0 constant, -1 decreasing, +1 increasing). Block i merges
    ``int(lo + (hi - lo) / (depth - 1) * i)`` tokens with lo = int(r * (1 - inflection)) and
    hi = 2r - lo: truncated, as in ToMe, so "decreasing" merges a little fewer than r * depth in
    all (91, not 96, at r=8 over 12 blocks). A list gives r per block and must have ``depth``
    values (ToMe pads a short one with zeros; here a wrong length is an error). With one block the
    schedule is [r] (ToMe's rule divides by depth - 1).
    """
    if not isinstance(r, int):
        r = [int(v) for v in r]
        if len(r) != depth or min(r) < 0:
            raise ConfigError(f"a per-block r list needs {depth} values >= 0, got {r}")
        return r
    if r < 0:
        raise ConfigError(f"ToMe r must be >= 0 (tokens merged per block), got {r}")
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ConfigError(
                f"ToMe schedule {schedule!r} must be one of {tuple(SCHEDULES)} or an inflection in [-1, 1]"
            )
        inflection = SCHEDULES[schedule]
    else:
        inflection = float(schedule)
        if not -1.0 <= inflection <= 1.0:
            raise ConfigError(f"ToMe schedule inflection must be in [-1, 1] (-1: decreasing), got {schedule}")
    if depth == 1:
        return [r]
    # The same float operations as ToMe's parse_r, so the truncation lands on the same integers.
    lo = int(r * (1.0 - inflection))
    hi = 2 * r - lo
    step = (hi - lo) / (depth - 1)
    return [int(lo + step * i) for i in range(depth)]


def apply_tome(
    model: nn.Module, r: int | Sequence[int] = 8, schedule: str | float = "constant", proportional: bool = True
) -> nn.Module:
    """Patch ``model`` in place to merge ``r`` tokens per block (an int, or one value per block).

    ``schedule`` spreads an int r over the blocks by ToMe's rule (see :func:`tome_schedule`).
    ``proportional`` adds log(size) to the attention logits, as ToMe's timm patch does by default
    (its MAE patch turns it off for MAE-pretrained models evaluated off the shelf).

    Works on vitkit models whose ``blocks`` are vitkit Blocks (ViT, DeiT, CaiT's self-attention
    blocks), in eval and in training; the weights and ``state_dict`` are unchanged. Returns the model.
    """
    per_block = tome_schedule(r, len(getattr(model, "blocks", ())) or 1, schedule)
    reducers = [partial(_merge_layer, r=v) if v > 0 else None for v in per_block]
    apply_reduction(model, reducers, kind="ToMe", proportional=proportional, settings={"r": per_block})
    return model


remove_tome = remove_reduction
