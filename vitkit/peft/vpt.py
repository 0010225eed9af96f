"""Visual prompt tuning (VPT, Jia et al. 2022): learned prompt tokens in a frozen ViT's sequence.

``vpt_shallow`` inserts P prompt tokens after the prefix tokens (class, distillation,
registers) at the input of the first block; they travel through every block and are removed
after the last one, so the final norm and the pooling see the layout they always saw.
``vpt_deep`` gives every block its own P prompts: the previous block's prompt outputs are
replaced by the next block's fresh set (VPT's reference code), i.e. each block runs on
``[prefix][prompts_i][patches]`` and returns ``[prefix][patches]``.

The prompts are one parameter, ``vpt.prompts`` ((1, P, D) shallow, (depth, P, D) deep), on a
module ``model.vpt``, so adapter files save and load them by name. The blocks are left where
they are (their state-dict keys do not move, base checkpoints load unchanged): forward hooks
on each block insert and remove the prompts. ``forward_intermediates`` returns the image
tokens only, as without prompts.
"""

from __future__ import annotations

import math
from types import MethodType

import torch
from torch import nn

from ..errors import ConfigError
from ..models.vit import VisionTransformer
from ..models.vitdet import ViTDet

PARAM = "vpt.prompts"


class VisualPrompts(nn.Module):
    """VPT's prompt tokens for a ViT of ``depth`` blocks and width ``dim``.

    Initialised as VPT: uniform in +-sqrt(6 / (3 * patch_h * patch_w + dim)) (xavier-uniform
    over the patch projection's fan-in); ``dropout`` acts on the prompts of each sample.
    """

    def __init__(self, depth: int, num_prompts: int, dim: int, patch_area: int, num_prefix_tokens: int,
                 deep: bool, dropout: float = 0.0):
        super().__init__()
        self.deep = deep
        self.depth = depth
        self.num_prompts = num_prompts
        self.num_prefix_tokens = num_prefix_tokens
        self.prompts = nn.Parameter(torch.empty(depth if deep else 1, num_prompts, dim))
        bound = math.sqrt(6.0 / (3 * patch_area + dim))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.dropout = nn.Dropout(dropout)

    def insert(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """(B, prefix + L, D) -> (B, prefix + P + L, D) with block ``block``'s prompts after the prefix."""
        npt = self.num_prefix_tokens
        # Expanded before dropout so that every sample draws its own mask, as VPT does.
        p = self.prompts[block if self.deep else 0][None].expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :npt], self.dropout(p).to(x.dtype), x[:, npt:]], dim=1)

    def remove(self, x: torch.Tensor) -> torch.Tensor:
        """(B, prefix + P + L, D) -> (B, prefix + L, D)."""
        npt = self.num_prefix_tokens
        return torch.cat([x[:, :npt], x[:, npt + self.num_prompts:]], dim=1)

    def extra_repr(self) -> str:
        kind = "deep" if self.deep else "shallow"
        return f"{kind}, prompts={self.num_prompts}, blocks={self.depth}, prefix={self.num_prefix_tokens}"


def _block_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, attn_bias) of a block call ``blk(x, rope, num_prefix_tokens, attn_bias)``."""
    x = args[0] if args else kwargs["x"]
    bias = args[3] if len(args) > 3 else kwargs.get("attn_bias")
    return x, bias


class _InsertPrompts:
    """Forward pre-hook of block ``index``: prompts into the block's input sequence."""

    def __init__(self, vpt: VisualPrompts, index: int):
        self.vpt, self.index = vpt, index

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict):
        x, bias = _block_args(args, kwargs)
        if bias is not None:
            raise ValueError(
                "VPT inserts prompt tokens into the sequence, which an attention bias sized for the image "
                "tokens (token merging, NaFlex key padding) cannot cover: run a VPT model without them"
            )
        x = self.vpt.insert(x, self.index)
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "x": x}


class _RemovePrompts:
    """Forward hook of a block: its prompt outputs out of the sequence."""

    def __init__(self, vpt: VisualPrompts):
        self.vpt = vpt

    def __call__(self, block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.vpt.remove(output)


def _intermediates_without_prompts(self, x: torch.Tensor, take, norm: bool):
    """The ViT's ``_intermediates`` with shallow prompts cut out of the blocks that still carry them."""
    final, points = type(self)._intermediates(self, x, take, norm)
    last = len(self.blocks) - 1
    points = [p._replace(x=self.vpt.remove(p.x)) if i != last else p for i, p in zip(take, points)]
    return final, points


def vpt_unsupported(model: nn.Module) -> str | None:
    """Why VPT cannot run on ``model`` (None when it can)."""
    if not isinstance(model, VisionTransformer):
        return f"VPT needs a plain token sequence (a ViT); {type(model).__name__} is not a VisionTransformer"
    if isinstance(model, ViTDet):
        return "VPT's prompts do not fit ViTDet's windowed attention"
    if model.rope is not None:
        return "VPT's prompts have no grid position, so they do not fit RoPE (pos_embed='rope')"
    if getattr(model, "vpt", None) is not None:
        return "the model already has VPT prompts"
    return None


def apply_vpt(model: nn.Module, cfg, deep: bool) -> list[str]:
    """Add VPT prompts to ``model`` in place; returns the new parameter's name (``vpt.prompts``).

    ``cfg`` is a :class:`~vitkit.peft.config.PeftConfig` (``vpt_prompts``, ``vpt_dropout``).
    Raises ConfigError for models VPT does not fit (see :func:`vpt_unsupported`).
    """
    why = vpt_unsupported(model)
    if why is not None:
        method = "vpt_deep" if deep else "vpt_shallow"
        raise ConfigError(f"peft.method={method} does not apply to {type(model).__name__}: {why}")
    if int(cfg.vpt_prompts) < 1:
        raise ConfigError(f"peft.vpt_prompts must be >= 1, got {cfg.vpt_prompts}")
    blocks = list(model.blocks)
    ref = next(model.parameters())
    ph, pw = model.patch_size
    vpt = VisualPrompts(len(blocks), int(cfg.vpt_prompts), model.embed_dim, ph * pw, model.num_prefix_tokens,
                        deep, float(cfg.vpt_dropout)).to(device=ref.device, dtype=ref.dtype)
    model.vpt = vpt
    remove = _RemovePrompts(vpt)
    for i, blk in enumerate(blocks):
        if deep or i == 0:
            blk.register_forward_pre_hook(_InsertPrompts(vpt, i), with_kwargs=True)
        if deep or i == len(blocks) - 1:
            blk.register_forward_hook(remove)
    if not deep:
        # Between blocks a shallow model's sequence carries the prompts; feature points must not.
        model._intermediates = MethodType(_intermediates_without_prompts, model)
    return [PARAM]


def apply_vpt_shallow(model: nn.Module, cfg) -> list[str]:
    """``peft.method=vpt_shallow``: prompts at the first block's input only."""
    return apply_vpt(model, cfg, deep=False)


def apply_vpt_deep(model: nn.Module, cfg) -> list[str]:
    """``peft.method=vpt_deep``: a fresh set of prompts at every block."""
    return apply_vpt(model, cfg, deep=True)


__all__ = ["VisualPrompts", "apply_vpt", "apply_vpt_deep", "apply_vpt_shallow", "vpt_unsupported"]
