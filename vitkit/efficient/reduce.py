"""Token reduction between attention and MLP: the machinery token merging and pruning share.

A reduction patches a model's ``blocks`` in place: each block's class is swapped for a subclass
whose ``forward`` runs the attention half, hands the queries and keys that attention used to a
per-layer reducer, and runs the MLP half on the fewer tokens. Per-token sizes (how many original
tokens each one stands for) live in a state shared by the blocks of one model; they give
proportional attention (log size added to the logits, through the attention bias, so SDPA stays
the kernel) and size-weighted average pooling at the end. Prefix tokens (class, distillation,
registers) are never reduced. Removing the reduction restores the classes and the pooling.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..layers.tokens import proportional_bias

# reducer(x, sizes, q, k, num_prefix_tokens, attn_bias) -> (x, sizes); x (B, N, D), sizes (B, N),
# q and k (B, heads, N, head_dim) as attention used them.
Reducer = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ReductionState:
    """What travels between the blocks of one forward pass."""

    kind: str
    proportional: bool
    settings: dict = field(default_factory=dict)  # what was applied (per-block r, pruned layers, ...)
    sizes: torch.Tensor | None = None  # (B, N) of the current sequence; None while nothing was reduced

    def __deepcopy__(self, memo: dict) -> ReductionState:
        # A copy (an EMA model, say) starts without the last forward's sizes, which may hold autograd history.
        return ReductionState(self.kind, self.proportional, copy.deepcopy(self.settings, memo))

    def attention_bias(self) -> torch.Tensor | None:
        if not self.proportional or self.sizes is None:
            return None
        return proportional_bias(self.sizes)


@dataclass
class _LayerPlan:
    state: ReductionState
    reducer: Reducer | None
    first: bool


_SUBCLASSES: dict[type, type] = {}


def _reducing_forward(self, x, rope=None, num_prefix_tokens=0, attn_bias=None):
    plan: _LayerPlan = self._token_reduction
    state = plan.state
    if plan.first:
        if attn_bias is not None:
            raise ConfigError(
                f"{state.kind} cannot reduce tokens that carry an attention bias (relative position bias, "
                "masks or merged inputs): use it on models without one"
            )
        state.sizes = None
    bias = state.attention_bias()
    if plan.reducer is None:
        return self.forward_mlp(self.forward_attn(x, rope, num_prefix_tokens, bias))
    x = self.forward_attn(x, rope, num_prefix_tokens, bias)
    q, k = self.attn.last_qk
    self.attn.last_qk = None
    sizes = state.sizes if state.sizes is not None else x.new_ones(x.shape[:2], dtype=torch.float32)
    x, state.sizes = plan.reducer(x, sizes, q, k, num_prefix_tokens, bias)
    return self.forward_mlp(x)


def _reducing_class(cls: type) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"TokenReducing{cls.__name__}", (cls,), {"forward": _reducing_forward})
    return _SUBCLASSES[cls]


class _SizeWeightedPool:
    """Average pooling that weighs each patch token by its size (an object, so deepcopy follows the model)."""

    def __init__(self, state: ReductionState, plain_pool: Callable, num_prefix_tokens: int):
        self.state, self.plain_pool, self.num_prefix_tokens = state, plain_pool, num_prefix_tokens

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sizes = self.state.sizes
        if sizes is None or sizes.shape[1] != x.shape[1]:
            return self.plain_pool(x)
        s = sizes[:, self.num_prefix_tokens:, None].to(x.dtype)  # (B, L, 1)
        return (x[:, self.num_prefix_tokens:] * s).sum(dim=1) / s.sum(dim=1)


def apply_reduction(
    model: nn.Module, reducers: Sequence[Reducer | None], *, kind: str, proportional: bool, settings: dict
) -> ReductionState:
    """Patch ``model.blocks`` so block i runs ``reducers[i]`` (None: no reduction) between its halves."""
    remove_reduction(model)
    blocks = getattr(model, "blocks", None)
    if blocks is None or not len(blocks) or not all(hasattr(b, "forward_attn") for b in blocks):
        raise ConfigError(
            f"{kind} needs a model whose `blocks` are vitkit Blocks (ViT, DeiT, CaiT); "
            f"{type(model).__name__} has none"
        )
    if len(reducers) != len(blocks):
        raise ConfigError(f"{kind}: {len(reducers)} per-layer settings for a model with {len(blocks)} blocks")
    if getattr(model, "rope", None) is not None:
        raise ConfigError(
            f"{kind} does not support RoPE models: a reduced token has no single grid position to rotate by"
        )
    if getattr(model, "grad_checkpointing", False):
        raise ConfigError(
            f"{kind} cannot run under gradient checkpointing (the recomputed blocks would see the final token "
            "count): call model.set_grad_checkpointing(False) first"
        )
    for i, (blk, reducer) in enumerate(zip(blocks, reducers)):
        if reducer is not None and not hasattr(blk.attn, "keep_qk"):
            raise ConfigError(f"{kind}: block {i} uses {type(blk.attn).__name__}, which does not expose its keys")
    state = ReductionState(kind=kind, proportional=proportional, settings=settings)
    for i, (blk, reducer) in enumerate(zip(blocks, reducers)):
        blk._token_reduction = _LayerPlan(state, reducer, first=i == 0)
        blk.__class__ = _reducing_class(type(blk))
        if reducer is not None:
            blk.attn.keep_qk = True
    if getattr(model, "global_pool", None) == "avg" and hasattr(model, "pool"):
        model.pool = _SizeWeightedPool(state, model.pool, model.num_prefix_tokens)
    model._token_reduction = state
    return state


def remove_reduction(model: nn.Module) -> nn.Module:
    """Undo token merging or pruning (a model without either is returned unchanged)."""
    if getattr(model, "_token_reduction", None) is None:
        return model
    for blk in model.blocks:
        if hasattr(blk, "_token_reduction"):
            blk.__class__ = blk.__class__.__mro__[1]
            del blk._token_reduction
            if hasattr(blk.attn, "keep_qk"):
                blk.attn.keep_qk = False
                blk.attn.last_qk = None
    model.__dict__.pop("pool", None)
    del model._token_reduction
    return model


def reduction_of(model: nn.Module) -> ReductionState | None:
    """The reduction state of a patched model (its ``sizes`` are those of the last forward), or None."""
    return getattr(model, "_token_reduction", None)
