"""Pyramid Vision Transformer v2 (Wang et al., 2022): global attention made cheap by shrinking keys.

Four stages at strides 4/8/16/32, each entered through an overlapping strided convolution.
Spatial-reduction attention: queries are every token, keys and values come from the map
shrunk by an ``sr x sr`` strided conv (8, 4, 2, 1 per stage), so attention costs N * N / sr^2.
The MLP has a 3x3 depthwise conv between its two linears, which also supplies position
information (there is no position embedding), so any input size works as is. Parameter names
follow the common PVT v2 checkpoint layout (``stages.N.blocks.M.attn.q``, ``attn.sr``,
``mlp.dwconv``).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import AttentionCore, DropPath, TokenContext
from ._base import StageBackbone, check_image, trunc_normal_linear
from ._registry import register_family

_LayerNormEps6 = partial(nn.LayerNorm, eps=1e-6)


class OverlapPatchEmbed(nn.Module):
    """Strided conv with a kernel larger than its stride (neighbouring patches overlap), then norm.

    (B, C, H, W) -> (B, ceil(H / stride), ceil(W / stride), D) for odd kernels padded by k // 2.
    """

    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int):
        super().__init__()
        if patch_size <= stride:
            raise ValueError(f"overlapping patch embedding needs patch_size > stride, got {patch_size} <= {stride}")
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H', W', D)


class SpatialReductionAttention(AttentionCore):
    """Queries from every token; keys and values from the map reduced ``sr_ratio`` times per side."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(attn_drop)
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def _reduce(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, N, C) -> (B, M, C) key/value tokens, M = floor(H / sr) * floor(W / sr)."""
        if self.sr_ratio == 1:
            return x
        B, N, C = x.shape
        H, W = size
        x = x.transpose(1, 2).reshape(B, C, H, W)
        # A map smaller than one reduction cell is zero-padded to one, so small inputs give one key.
        x = F.pad(x, (0, max(self.sr_ratio - W, 0), 0, max(self.sr_ratio - H, 0)))
        x = self.sr(x).flatten(2).transpose(1, 2)  # (B, M, C)
        return self.norm(x)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, head_dim)
        kv = self.kv(self._reduce(x, size))
        kv = kv.reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, heads, M, head_dim)
        x = self.attend(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class ConvMlp(nn.Module):
    """fc1 -> 3x3 depthwise conv on the token map -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.fc1(x)
        B, N, C = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(B, C, *size)).flatten(2).transpose(1, 2)  # (B, N, hidden)
        return self.drop(self.fc2(self.drop(self.act(x))))


class PvtBlock(nn.Module):
    """Pre-norm block: x + drop_path(sra(norm1(x))), then x + drop_path(conv_mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = _LayerNormEps6(dim)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = _LayerNormEps6(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), size))
        return x + self.drop_path2(self.mlp(self.norm2(x), size))


class PvtStage(nn.Module):
    """Optional 3x3 stride-2 overlapping embedding, blocks, and the stage's own norm."""

    def __init__(self, dim: int, out_dim: int, depth: int, downsample: bool, drop_path: list[float], **block):
        super().__init__()
        self.downsample = OverlapPatchEmbed(3, 2, dim, out_dim) if downsample else None
        self.blocks = nn.ModuleList([PvtBlock(out_dim, drop_path=drop_path[i], **block) for i in range(depth)])
        self.norm = _LayerNormEps6(out_dim)


class PyramidVisionTransformerV2(StageBackbone):
    """PVT v2 backbone with a classification head (average pooling of the last stage)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: tuple[int, ...] = (3, 4, 6, 3),
        embed_dims: tuple[int, ...] = (64, 128, 256, 512),
        num_heads: tuple[int, ...] = (1, 2, 4, 8),
        sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
        mlp_ratios: tuple[float, ...] = (8.0, 8.0, 4.0, 4.0),
        patch_size: int = 7,
        patch_stride: int = 4,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        n = len(depths)
        if not len(embed_dims) == len(num_heads) == len(sr_ratios) == len(mlp_ratios) == n:
            raise ValueError(
                f"depths, embed_dims, num_heads, sr_ratios and mlp_ratios need one entry per stage, got "
                f"{depths}, {embed_dims}, {num_heads}, {sr_ratios}, {mlp_ratios}"
            )
        self.img_size = img_size
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = embed_dims[-1]
        self.embed_dim = embed_dims[0]
        self.patch_embed = OverlapPatchEmbed(patch_size, patch_stride, in_chans, embed_dims[0])
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # stochastic depth grows with depth
        stages, start = [], 0
        for i, depth in enumerate(depths):
            stages.append(PvtStage(
                embed_dims[max(i - 1, 0)], embed_dims[i], depth, downsample=i > 0,
                drop_path=dpr[start:start + depth], num_heads=num_heads[i], mlp_ratio=mlp_ratios[i],
                sr_ratio=sr_ratios[i], qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
            ))
            start += depth
        self.stages = nn.ModuleList(stages)
        self.init_classifier(num_classes, drop_rate)
        self.feature_info = [
            dict(num_chs=d, reduction=patch_stride * 2**i, module=f"stages.{i}") for i, d in enumerate(embed_dims)
        ]
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            trunc_normal_linear(m)
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, std=(2.0 / fan_out) ** 0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ backbone API
    def attention_stats(self, h: int, w: int) -> list[dict]:
        """What attention costs on an h x w image, per stage: for ``vitkit info``."""
        out = []
        for i, stage in enumerate(self.stages):
            conv = self.patch_embed.proj if i == 0 else stage.downsample.proj
            k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            attn = stage.blocks[0].attn
            sr = attn.sr_ratio
            keys = h * w if sr == 1 else max(h // sr, 1) * max(w // sr, 1)
            out.append(dict(module=f"stages.{i}", grid=[h, w], tokens=h * w, heads=attn.num_heads, sr_ratio=sr,
                            keys_per_query=keys, attn_elems=attn.num_heads * h * w * keys, blocks=len(stage.blocks)))
        return out

    # ------------------------------------------------------------------ token path
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, TokenContext]:
        """(B, C, H, W) -> (B, H/4 * W/4, C) normalised patch tokens and their context."""
        check_image(x, self.in_chans)
        x = self.patch_embed(x)  # (B, H', W', C)
        B, H, W, C = x.shape
        positions = torch.arange(H * W, device=x.device)[None]
        return x.reshape(B, H * W, C), TokenContext((H, W), 0, positions)

    def _stages(self, tokens: torch.Tensor, ctx: TokenContext):
        """Yield each stage's normalised (B, H, W, C) map."""
        B, _, C = tokens.shape
        x = tokens.reshape(B, *ctx.grid, C)
        for stage in self.stages:
            if stage.downsample is not None:
                x = stage.downsample(x.permute(0, 3, 1, 2))  # (B, H/2, W/2, C')
            B, H, W, C = x.shape
            x = x.reshape(B, H * W, C)
            for blk in stage.blocks:
                x = self.checkpointed(blk, x, (H, W))
            x = stage.norm(x).reshape(B, H, W, C)
            yield x

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x  # each stage ends with its own norm


_register = register_family(
    "pvt_v2", PyramidVisionTransformerV2,
    paper="PVT v2: Improved Baselines with Pyramid Vision Transformer (Wang et al., 2022)",
)


_HEADS = (1, 2, 5, 8)
_register("pvt_v2_b0", dict(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256), num_heads=_HEADS),
          hub_id="timm/pvt_v2_b0.in1k")
_register("pvt_v2_b1", dict(depths=(2, 2, 2, 2), embed_dims=(64, 128, 320, 512), num_heads=_HEADS),
          hub_id="timm/pvt_v2_b1.in1k")
_register("pvt_v2_b2", dict(depths=(3, 4, 6, 3), embed_dims=(64, 128, 320, 512), num_heads=_HEADS),
          hub_id="timm/pvt_v2_b2.in1k")

# Tiny test variant: a 3x3 stride-2 stem keeps the last stage at 2x2 tokens at 32 px.
_register(
    "test_pvt_v2",
    dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 32, 64), num_heads=(1, 2, 2, 4), sr_ratios=(4, 2, 1, 1),
         patch_size=3, patch_stride=2),
    img=32, crop_pct=1.0, paper="tiny test variant", notes="for tests; not a real model",
)

__all__ = ["PyramidVisionTransformerV2"]
