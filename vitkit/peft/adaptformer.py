"""AdaptFormer (Chen et al. 2022): a bottleneck adapter in parallel with each block's MLP.

As the reference code's defaults (``ffn_option="parallel"``, ``ffn_adapter_layernorm_option="none"``,
``ffn_adapter_init_option="lora"``): the MLP residual of a pre-norm block becomes

    x + drop_path(ls2(mlp(norm2(x)))) + s * up(dropout(relu(down(x))))

where the adapter reads the residual stream x entering the MLP branch (not norm2(x)) and sits
outside drop path and layer scale. ``down`` (D -> width) is kaiming-uniform, ``up`` and both
biases are zero, so the model equals its base until ``up`` trains.

The adapter is a child of its block (``blocks.i.adapter.down|up``, Swin
``layers.s.blocks.j.adapter...``); the base keys do not move. Known blocks: vitkit's
:class:`~vitkit.layers.Block` (ViT, DeiT and the families built from it) and Swin's blocks.
In a post-norm block (and Swin v2's res-post-norm) the adapter joins the MLP branch where
the block adds it to the stream: ``norm2(x + drop_path(ls2(mlp(x))) + s * adapter(x))``.
"""

from __future__ import annotations

import math
from types import MethodType

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import Block
from ..models.swin import SwinBlock


class Adapter(nn.Module):
    """AdaptFormer's bottleneck: ``scale * up(dropout(relu(down(x))))``, zero at initialisation."""

    def __init__(self, dim: int, width: int = 64, scale: float = 0.1, dropout: float = 0.0):
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(dim, width)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(width, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def _block_forward_mlp(self: Block, x: torch.Tensor) -> torch.Tensor:
    """:meth:`Block.forward_mlp` with the adapter beside the MLP."""
    if self.post_norm:
        return self.norm2(x + self.drop_path2(self.ls2(self.mlp(x))) + self.adapter(x))
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) + self.adapter(x)


def _swin_forward(self: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """:meth:`SwinBlock.forward` with the adapter beside the MLP."""
    if self.res_post_norm:
        x = x + self.drop_path1(self.norm1(self._attn(x)))
        return x + self.drop_path2(self.norm2(self.mlp(x))) + self.adapter(x)
    x = x + self.drop_path1(self._attn(self.norm1(x)))
    return x + self.drop_path2(self.mlp(self.norm2(x))) + self.adapter(x)


# Block type -> (the method the adapter replaces, its replacement).
_PATCHES = {Block: ("forward_mlp", _block_forward_mlp), SwinBlock: ("forward", _swin_forward)}


def _width(block: nn.Module) -> int:
    """The block's token width: the input features of its MLP's first Linear."""
    return next(m for m in block.mlp.modules() if isinstance(m, nn.Linear)).in_features


def adaptformer_unsupported(model: nn.Module) -> str | None:
    """Why AdaptFormer cannot run on ``model`` (None when it can)."""
    known = ", ".join(t.__name__ for t in _PATCHES)
    blocks_of = getattr(model, "block_modules", None)
    blocks = blocks_of() if callable(blocks_of) else []
    if not blocks:
        return f"it lists no transformer blocks (block_modules()); AdaptFormer knows {known}"
    unknown = sorted({type(b).__name__ for b in blocks if type(b) not in _PATCHES})
    if unknown:
        return f"its blocks are {', '.join(unknown)}; AdaptFormer knows {known}"
    if any(hasattr(b, "adapter") for b in blocks):
        return "the model already has AdaptFormer adapters"
    return None


def apply_adaptformer(model: nn.Module, cfg) -> list[str]:
    """Add an AdaptFormer adapter to every block of ``model`` in place; returns the new parameters' names.

    ``cfg`` is a :class:`~vitkit.peft.config.PeftConfig` (``adapter_width``, ``adapter_scale``,
    ``adapter_dropout``). Each block gets ``2 * D * width + width + D`` parameters.
    """
    why = adaptformer_unsupported(model)
    if why is not None:
        raise ConfigError(f"peft.method=adaptformer does not apply to {type(model).__name__}: {why}")
    if int(cfg.adapter_width) < 1:
        raise ConfigError(f"peft.adapter_width must be >= 1, got {cfg.adapter_width}")
    names = {m: n for n, m in model.named_modules()}
    params = []
    for blk in model.block_modules():
        ref = next(blk.parameters())
        blk.adapter = Adapter(_width(blk), int(cfg.adapter_width), float(cfg.adapter_scale),
                              float(cfg.adapter_dropout)).to(device=ref.device, dtype=ref.dtype)
        attr, fn = _PATCHES[type(blk)]
        setattr(blk, attr, MethodType(fn, blk))
        params += [f"{names[blk]}.adapter.{n}" for n, _ in blk.adapter.named_parameters()]
    return params


__all__ = ["Adapter", "adaptformer_unsupported", "apply_adaptformer"]
