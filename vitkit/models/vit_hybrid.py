"""Hybrid ViT: a ResNet (v2 layout, GroupNorm + weight-standardised convs) computes a feature map,
and each of its cells becomes a token for a ViT (Dosovitskiy et al., 2021, section 3.1).

The ResNet supplies the convolutional inductive bias of the first layers; the transformer sees
a 32x (R26) or 16x (R50, three stages) downsampled map instead of 16x16 pixel patches. All
convs use 'SAME' padding, so any input size works and gives ceil(size / stride) tokens per side.
Parameter names follow the common checkpoint layout (``patch_embed.backbone.stem.conv``,
``patch_embed.backbone.stages.N.blocks.M.conv1``, ``patch_embed.proj``, then the ViT's).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import MaxPool2dSame, StdConv2dSame
from ._registry import INCEPTION_MEAN, INCEPTION_STD, register_family
from .vit import VisionTransformer


class _GroupNormAct(nn.GroupNorm):
    """GroupNorm, then ReLU unless ``act=False`` (the last norm of a residual branch)."""

    def __init__(self, channels: int, groups: int, act: bool = True):
        super().__init__(groups, channels, eps=1e-5)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class _Downsample(nn.Module):
    """1x1 strided conv + GroupNorm on the shortcut when a block changes width or resolution."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, groups: int):
        super().__init__()
        self.conv = StdConv2dSame(in_chs, out_chs, 1, stride=stride)
        self.norm = _GroupNormAct(out_chs, groups, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class ResNetV2Bottleneck(nn.Module):
    """Post-activation bottleneck: 1x1 -> 3x3 (strided) -> 1x1, GroupNorm after each, ReLU after the sum."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, groups: int):
        super().__init__()
        mid = out_chs // 4
        self.downsample = _Downsample(in_chs, out_chs, stride, groups) if stride > 1 or in_chs != out_chs else None
        self.conv1 = StdConv2dSame(in_chs, mid, 1)
        self.norm1 = _GroupNormAct(mid, groups)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride=stride)
        self.norm2 = _GroupNormAct(mid, groups)
        self.conv3 = StdConv2dSame(mid, out_chs, 1)
        self.norm3 = _GroupNormAct(out_chs, groups, act=False)
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return self.act3(x + shortcut)


class _Stage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, depth: int, groups: int):
        super().__init__()
        self.blocks = nn.Sequential(*[
            ResNetV2Bottleneck(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1, groups)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetV2Backbone(nn.Module):
    """7x7/2 conv stem + 3x3/2 max pool, then bottleneck stages (the first at stride 1)."""

    def __init__(
        self, layers: tuple[int, ...], in_chans: int = 3, stem_width: int = 64,
        channels: tuple[int, ...] = (256, 512, 1024, 2048), groups: int = 32,
    ):
        super().__init__()
        self.stem = nn.Sequential()
        self.stem.add_module("conv", StdConv2dSame(in_chans, stem_width, 7, stride=2))
        self.stem.add_module("norm", _GroupNormAct(stem_width, groups))
        self.stem.add_module("pool", MaxPool2dSame(3, 2))
        stages, in_chs = [], stem_width
        for i, (depth, out_chs) in enumerate(zip(layers, channels)):
            stages.append(_Stage(in_chs, out_chs, 1 if i == 0 else 2, depth, groups))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.num_features = in_chs
        self.reduction = 4 * 2 ** (len(layers) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class HybridEmbed(nn.Module):
    """ResNet feature map -> 1x1 projection -> (B, H'*W', D) tokens.

    Offers what the ViT asks of a patch embedding (``grid_size``, ``patch_size``, ``dynamic_grid``,
    ``proj``); the "patch" is the backbone's total stride.
    """

    def __init__(self, img_size: tuple[int, int], backbone: ResNetV2Backbone, embed_dim: int):
        super().__init__()
        self.backbone = backbone
        r = backbone.reduction
        self.patch_size = (r, r)
        self.grid_size = self.dynamic_grid(*img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(backbone.num_features, embed_dim, 1)

    def dynamic_grid(self, h: int, w: int) -> tuple[int, int]:
        """'SAME' padding at every stride: ceil(size / total stride) cells per side."""
        return math.ceil(h / self.patch_size[0]), math.ceil(w / self.patch_size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x)).flatten(2).transpose(1, 2)  # (B, H'*W', D)


def vit_hybrid(
    layers: tuple[int, ...] = (2, 2, 2, 2),
    stem_width: int = 64,
    channels: tuple[int, ...] = (256, 512, 1024, 2048),
    gn_groups: int = 32,
    img_size: int | tuple[int, int] = 224,
    in_chans: int = 3,
    **vit_kwargs,
) -> VisionTransformer:
    """A ViT whose patch embedding is a ResNetV2 backbone + 1x1 projection."""
    if vit_kwargs.get("conv_stem"):
        raise ValueError("a hybrid ViT already has a ResNet stem; conv_stem=True does not apply")
    backbone = ResNetV2Backbone(layers, in_chans, stem_width, channels, gn_groups)
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    # Built with the backbone's stride as patch size so the ViT sizes its grid and feature_info alike.
    vit_kwargs["patch_size"] = backbone.reduction
    vit_kwargs["dynamic_img_pad"] = True
    model = VisionTransformer(img_size=size, in_chans=in_chans, **vit_kwargs)
    model.patch_embed = HybridEmbed(size, backbone, model.embed_dim)
    return model


# ---------------------------------------------------------------------- variants
HYBRID_PAPER = "An Image is Worth 16x16 Words (Dosovitskiy et al., 2021), hybrid architecture"
_VARIANTS = {
    # name: (ResNet layers, ViT size, image size, checkpoint tag)
    "vit_small_r26_s32_224": ((2, 2, 2, 2), dict(embed_dim=384, depth=12, num_heads=6), 224, "augreg_in21k_ft_in1k"),
    "vit_small_r26_s32_384": ((2, 2, 2, 2), dict(embed_dim=384, depth=12, num_heads=6), 384, "augreg_in21k_ft_in1k"),
    "vit_base_r50_s16_224": ((3, 4, 9), dict(embed_dim=768, depth=12, num_heads=12), 224, None),
    "vit_base_r50_s16_384": ((3, 4, 9), dict(embed_dim=768, depth=12, num_heads=12), 384, "orig_in21k_ft_in1k"),
    "vit_large_r50_s32_224": ((3, 4, 6, 3), dict(embed_dim=1024, depth=24, num_heads=16), 224, "augreg_in21k_ft_in1k"),
    "vit_large_r50_s32_384": ((3, 4, 6, 3), dict(embed_dim=1024, depth=24, num_heads=16), 384, "augreg_in21k_ft_in1k"),
}


_register = register_family("vit_hybrid", vit_hybrid)


for _name, (_layers, _vit, _img, _tag) in _VARIANTS.items():
    _register(
        _name, dict(layers=_layers, **_vit), img=_img, mean=INCEPTION_MEAN, std=INCEPTION_STD,
        crop_pct=0.9 if _img == 224 else 1.0, paper=HYBRID_PAPER,
        hub_id=f"timm/{_name}.{_tag}" if _tag else None,
    )

_register(
    "test_vit_hybrid",
    dict(layers=(1, 1), stem_width=16, channels=(32, 64), gn_groups=8, embed_dim=64, depth=2, num_heads=2),
    img=32, crop_pct=1.0, paper="tiny test variant", notes="for tests; not a real model",
)

__all__ = ["HybridEmbed", "ResNetV2Backbone", "vit_hybrid"]
