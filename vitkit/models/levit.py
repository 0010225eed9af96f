"""LeViT: a convolutional stem, then attention stages that shrink the token grid.

Ingredients (Graham et al., 2021): a stack of stride-2 3x3 convs as the stem; attention with
a learned per-head bias indexed by the (|dy|, |dx|) offset between two tokens, replacing
position embeddings; "shrink" attention between stages, whose queries come from every second
token so the grid halves while keys and values see the full grid; hard-swish activations; and
BatchNorm after every linear map, which :meth:`Levit.fuse` folds into the weights for inference.

Tokens travel as (B, N, C) with the grid alongside. The bias tables are stored at the build
resolution; another input size crops them (smaller grids: exact) or resamples them bicubically
(larger grids). Parameter names follow timm's LeViT (``stem.conv1.linear``,
``stages.N.blocks.M.attn.qkv.linear``, ``attention_biases``, ``head.bn``, ``head_dist.linear``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import DropPath
from ..layers.offset_bias import OffsetBias
from ._base import Backbone, Point, check_image, checkpoint_if, map_to_tokens, tokens_to_map
from ._registry import register_family


# ---------------------------------------------------------------------- linear maps with BatchNorm
def _fold(weight: torch.Tensor, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """BN(W x) = (s W) x + (beta - s mu) with s = gamma / sqrt(var + eps), per output channel."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    w = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    return w, bn.bias - bn.running_mean * scale


class ConvNorm(nn.Module):
    """Conv2d without bias, then BatchNorm2d."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int = 0):
        super().__init__()
        self.linear = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        c = self.linear
        fused = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, device=c.weight.device)
        w, b = _fold(c.weight, self.bn)
        fused.weight.copy_(w)
        fused.bias.copy_(b)
        return fused


class LinearNorm(nn.Module):
    """Linear without bias on (B, N, C) tokens, then BatchNorm over every token's channels."""

    def __init__(self, in_features: int, out_features: int, bn_weight_init: float = 1.0):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)  # BN1d wants (B*N, C)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        fused = nn.Linear(self.linear.in_features, self.linear.out_features, device=self.linear.weight.device)
        w, b = _fold(self.linear.weight, self.bn)
        fused.weight.copy_(w)
        fused.bias.copy_(b)
        return fused


class NormLinear(nn.Module):
    """Classifier: BatchNorm1d, dropout, Linear."""

    def __init__(self, in_features: int, out_features: int, drop: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(in_features, out_features)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(self.bn(x)))

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        # W (s x + t) + b = (W s) x + (W t + b): the BN sits before the Linear, so it scales columns.
        bn, lin = self.bn, self.linear
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        shift = bn.bias - bn.running_mean * scale
        fused = nn.Linear(lin.in_features, lin.out_features, device=lin.weight.device)
        fused.weight.copy_(lin.weight * scale[None])
        fused.bias.copy_(lin.weight @ shift + lin.bias)
        return fused


def fuse_batchnorm(module: nn.Module) -> nn.Module:
    """Replace, in place, every child that has a ``fuse()`` (linear map + BN) by its folded map."""
    for name, child in module.named_children():
        if isinstance(child, (ConvNorm, LinearNorm, NormLinear)):
            setattr(module, name, child.fuse())
        else:
            fuse_batchnorm(child)
    return module


# ---------------------------------------------------------------------- attention with offset bias
# Residual branches end in a BatchNorm whose scale starts near zero, so each block starts
# close to the identity (LayerScale's 1e-5) while every weight still gets a gradient.
_BRANCH_BN_INIT = 1e-5


class LevitAttention(OffsetBias):
    """Multi-head attention over (B, N, C) tokens with offset biases; values are wider than keys."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, resolution: tuple[int, int], act_layer):
        super().__init__(num_heads, resolution)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.qkv = LinearNorm(dim, num_heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Sequential(OrderedDict([
            ("act", act_layer()), ("ln", LinearNorm(num_heads * self.val_dim, dim, bn_weight_init=_BRANCH_BN_INIT)),
        ]))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, _ = x.shape
        # Each head's slice is laid out [q | k | v].
        q, k, v = self.qkv(x).reshape(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, N, key_dim | val_dim)
        bias = self.offset_bias(grid).to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))


class _SubsampleQuery(nn.Module):
    """Queries from every second token of the grid (the shrink), then a LinearNorm."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.ln = LinearNorm(in_dim, out_dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, _, C = x.shape
        x = x.reshape(B, *grid, C)[:, ::2, ::2].reshape(B, -1, C)  # (B, ceil(H/2)*ceil(W/2), C)
        return self.ln(x)


class AttentionDownsample(OffsetBias):
    """Shrink attention: queries on a stride-2 subgrid, keys and values on the full grid."""

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, num_heads: int, attn_ratio: float,
                 resolution: tuple[int, int], act_layer):
        super().__init__(num_heads, resolution)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.kv = LinearNorm(in_dim, num_heads * (key_dim + self.val_dim))
        self.q = _SubsampleQuery(in_dim, num_heads * key_dim)
        self.proj = nn.Sequential(OrderedDict([("act", act_layer()), ("ln", LinearNorm(num_heads * self.val_dim, out_dim))]))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, _ = x.shape
        k, v = self.kv(x).reshape(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, N, key_dim | val_dim)
        q = self.q(x, grid)
        q = q.reshape(B, q.shape[1], self.num_heads, self.key_dim).transpose(1, 2)  # (B, heads, Nq, key_dim)
        bias = self.offset_bias(grid, stride=2).to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(B, q.shape[2], -1))


class LevitMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act_layer):
        super().__init__()
        self.ln1 = LinearNorm(dim, hidden)
        self.act = act_layer()
        self.ln2 = LinearNorm(hidden, dim, bn_weight_init=_BRANCH_BN_INIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln2(self.act(self.ln1(x)))


class LevitBlock(nn.Module):
    def __init__(self, dim, key_dim, num_heads, attn_ratio, mlp_ratio, resolution, act_layer, drop_path=0.0):
        super().__init__()
        self.attn = LevitAttention(dim, key_dim, num_heads, attn_ratio, resolution, act_layer)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = LevitMlp(dim, int(dim * mlp_ratio), act_layer)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(x, grid))
        return x + self.drop_path2(self.mlp(x))


class LevitDownsample(nn.Module):
    """Shrink attention (no residual: the width and grid change), then a residual MLP."""

    def __init__(self, in_dim, out_dim, key_dim, resolution, act_layer, drop_path=0.0):
        super().__init__()
        self.attn_downsample = AttentionDownsample(in_dim, out_dim, key_dim, in_dim // key_dim, 4.0, resolution, act_layer)
        self.mlp = LevitMlp(out_dim, out_dim * 2, act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.attn_downsample(x, grid)
        return x + self.drop_path(self.mlp(x))


def _half(grid: tuple[int, int]) -> tuple[int, int]:
    return (grid[0] + 1) // 2, (grid[1] + 1) // 2


class LevitStage(nn.Module):
    def __init__(self, in_dim, out_dim, key_dim, depth, num_heads, attn_ratio, mlp_ratio, resolution, act_layer,
                 downsample: bool, drop_path=0.0):
        super().__init__()
        if downsample:
            self.downsample = LevitDownsample(in_dim, out_dim, key_dim, resolution, act_layer, drop_path)
            resolution = _half(resolution)
        else:
            self.downsample = None
        self.blocks = nn.ModuleList([
            LevitBlock(out_dim, key_dim, num_heads, attn_ratio, mlp_ratio, resolution, act_layer, drop_path)
            for _ in range(depth)
        ])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.downsample is not None:
            x = self._run(self.downsample, x, grid)
            grid = _half(grid)
        for blk in self.blocks:
            x = self._run(blk, x, grid)
        return x, grid

    def _run(self, module: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return checkpoint_if(self.grad_checkpointing, module, x, grid)


class Stem(nn.Sequential):
    """log2(stride) stride-2 3x3 ConvNorms with activations between; widths double up to ``out_chs``."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, act_layer):
        super().__init__()
        n = stride.bit_length() - 1
        if stride < 2 or stride != 2 ** n:
            raise ValueError(f"stem_stride must be a power of two >= 2, got {stride}")
        c = in_chs
        for i in range(n):
            width = out_chs // 2 ** (n - 1 - i)
            self.add_module(f"conv{i + 1}", ConvNorm(c, width, 3, stride=2, padding=1))
            if i < n - 1:
                self.add_module(f"act{i + 1}", act_layer())
            c = width


def _out_chs(conv: nn.Module) -> int:
    """Output channels of a ConvNorm, or of the Conv2d that ``fuse()`` turns it into."""
    return conv.out_channels if isinstance(conv, nn.Conv2d) else conv.linear.out_channels


_ACTS = {"hard_swish": nn.Hardswish, "silu": nn.SiLU, "gelu": nn.GELU}


class Levit(Backbone):
    """LeViT backbone: conv stem, then stages of attention blocks (each stage after the first
    starts with shrink attention), average pooling and a BatchNorm + Linear head (two when
    ``distilled``: in training both logits are returned, in eval their mean).
    """

    pools = ("avg", "")
    no_weight_decay_keys = ("attention_biases",)
    recomputed_keys = ("attention_bias_idxs",)  # timm saves the bias index; vitkit computes it per grid

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: tuple[int, ...] = (192,),
        key_dim: int = 64,
        depth: tuple[int, ...] = (12,),
        num_heads: tuple[int, ...] = (3,),
        attn_ratio: float = 2.0,
        mlp_ratio: float = 2.0,
        stem_stride: int = 16,
        act_layer: str = "hard_swish",
        distilled: bool = True,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if not len(embed_dim) == len(depth) == len(num_heads):
            raise ValueError(f"embed_dim {embed_dim}, depth {depth} and num_heads {num_heads} need one entry per stage")
        if act_layer not in _ACTS:
            raise ValueError(f"act_layer must be one of {sorted(_ACTS)}, got {act_layer!r}")
        act = _ACTS[act_layer]
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = embed_dim[-1]
        self.embed_dim = embed_dim
        self.distilled = distilled
        self.drop_rate = drop_rate

        self.stem = Stem(in_chans, embed_dim[0], stem_stride, act)
        resolution = (-(-img_size[0] // stem_stride), -(-img_size[1] // stem_stride))
        stride, in_dim, stages = stem_stride, embed_dim[0], []
        self.feature_info = []
        for i, dim in enumerate(embed_dim):
            stages.append(LevitStage(
                in_dim, dim, key_dim, depth[i], num_heads[i], attn_ratio, mlp_ratio, resolution, act,
                downsample=i > 0, drop_path=drop_path_rate,
            ))
            if i > 0:
                stride, resolution = stride * 2, _half(resolution)
            self.feature_info.append(dict(num_chs=dim, reduction=stride, module=f"stages.{i}"))
            in_dim = dim
        self.stages = nn.ModuleList(stages)
        self.init_classifier(num_classes, 0.0, distilled)  # the dropout sits inside NormLinear

    # ------------------------------------------------------------------ backbone API
    def _new_classifier(self, num_classes: int, init: bool = True, device=None) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = NormLinear(self.num_features, num_classes, self.drop_rate)
        return head if device is None else head.to(device)

    def group_matcher(self, coarse: bool = False) -> dict:
        return {
            "stem": r"^stem",
            "blocks": [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)],
        }

    @torch.no_grad()
    def fuse(self) -> Levit:
        """Fold every BatchNorm into the linear map next to it, in place, for inference.

        The model switches to eval mode (folding uses the running statistics) and can no longer
        be trained or load checkpoints with BatchNorm keys. Outputs stay equal up to rounding.
        """
        self.eval()
        fuse_batchnorm(self)
        return self

    # ------------------------------------------------------------------ forward
    def _intermediates(self, x: torch.Tensor, take, norm: bool) -> tuple[torch.Tensor, list[Point]]:
        """Last-stage tokens (B, N, C_last) in row-major grid order (LeViT has no final norm), and
        the tokens of the stages in ``take``."""
        check_image(x, self.in_chans)
        x = self.stem(x)  # (B, C, H', W')
        x, grid = map_to_tokens(x), (x.shape[2], x.shape[3])
        feats = []
        for i, stage in enumerate(self.stages):
            x, grid = stage(x, grid)
            if i in take:
                feats.append(Point(x, grid))
        return x, feats

    def _pyramid_sources(self) -> list[dict]:
        """The stem's activations (strides 2, 4, ... below the stem's stride), then the stages.

        The stages start at the stem's stride (16 for the real variants), so the stem's
        activations give the pyramid its strides 4 and 8.
        """
        stem = [dict(num_chs=_out_chs(m), reduction=2 ** (k + 1), module=f"stem.act{k + 1}")
                for k, m in enumerate(c for n, c in self.stem.named_children() if n.startswith("conv"))][:-1]
        return stem + self.feature_info

    def _pyramid_maps(self, x: torch.Tensor, idx: list[int], norm: bool):
        check_image(x, self.in_chans)
        maps, k = {}, 0
        for name, layer in self.stem.named_children():
            x = layer(x)
            if name.startswith("act"):
                if k in idx:
                    maps[k] = x
                k += 1
        x, grid = map_to_tokens(x), (x.shape[2], x.shape[3])
        for stage in self.stages:
            x, grid = stage(x, grid)
            if k in idx:
                maps[k] = tokens_to_map(x, grid)
            k += 1
        return x, maps


# ---------------------------------------------------------------------- variants
LEVIT_PAPER = "LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference (Graham et al., 2021)"

_CONFIGS = {
    "levit_128s": dict(embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 6, 8), depth=(2, 3, 4)),
    "levit_128": dict(embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 8, 12), depth=(4, 4, 4)),
    "levit_192": dict(embed_dim=(192, 288, 384), key_dim=32, num_heads=(3, 5, 6), depth=(4, 4, 4)),
    "levit_256": dict(embed_dim=(256, 384, 512), key_dim=32, num_heads=(4, 6, 8), depth=(4, 4, 4)),
}
_register = register_family("levit", Levit, paper=LEVIT_PAPER)
for _name, _cfg in _CONFIGS.items():
    _register(
        _name, _cfg, hub_id=f"timm/{_name}.fb_dist_in1k",
        notes="distilled: two heads; call model.fuse() after loading to fold BatchNorm for inference",
    )
# Stem stride 2 so that three stages end at stride 8 on 32 px inputs.
_register(
    "test_levit",
    dict(embed_dim=(16, 24, 32), key_dim=8, num_heads=(2, 3, 4), depth=(1, 1, 1), stem_stride=2), img=32,
    crop_pct=1.0, paper="tiny test variant", notes="for tests; not a real model",
)

__all__ = ["Levit", "fuse_batchnorm"]
