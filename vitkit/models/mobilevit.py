"""MobileViT (v1): MobileNetV2 inverted residuals with transformer blocks between them.

A MobileViT block (Mehta & Rastegari, 2022) models a feature map locally (3x3 conv, 1x1 to
the transformer width), then globally: the map is cut into 2x2 patches and a transformer
attends across patches among the pixels that share a position inside their patch, so every
pixel sees the whole image at 1/4 of the cost. The map is folded back, projected, and fused
with the block's input by a 3x3 conv. Maps whose side is not a multiple of the patch are
resized to the next multiple for the transformer and back.

Parameter names follow timm's MobileViT (``stem.conv``, ``stages.S.B.conv1_1x1.bn``,
``stages.S.1.transformer.N.attn.qkv``, ``final_conv``, ``head.fc``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Block, DropPath
from ._base import Backbone, Point, check_image, map_to_tokens
from ._registry import register_family


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor``, never more than 10% below ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvNormAct(nn.Module):
    """Conv2d (no bias, 'same' padding) -> BatchNorm2d -> SiLU (or nothing)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class InvertedResidual(nn.Module):
    """1x1 expand -> depthwise 3x3 (carries the stride) -> 1x1 project; residual when shapes allow."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: float, drop_path: float = 0.0):
        super().__init__()
        mid = make_divisible(in_chs * expand_ratio)
        self.conv1_1x1 = ConvNormAct(in_chs, mid, 1)
        self.conv2_kxk = ConvNormAct(mid, mid, 3, stride=stride, groups=mid)
        self.conv3_1x1 = ConvNormAct(mid, out_chs, 1, act=False)
        self.has_shortcut = in_chs == out_chs and stride == 1
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.has_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3_1x1(self.conv2_kxk(self.conv1_1x1(x)))
        return x + self.drop_path(y) if self.has_shortcut else y


class MobileVitBlock(nn.Module):
    """Local conv, global attention across patches, fold back, fuse with the input."""

    def __init__(self, chs: int, transformer_dim: int, transformer_depth: int, patch_size: int = 2,
                 num_heads: int = 4, mlp_ratio: float = 2.0, drop_path: float = 0.0):
        super().__init__()
        self.conv_kxk = ConvNormAct(chs, chs, 3)
        self.conv_1x1 = nn.Conv2d(chs, transformer_dim, 1, bias=False)
        self.transformer = nn.Sequential(*[
            Block(transformer_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path, act_layer=nn.SiLU,
                  norm_layer=nn.LayerNorm)
            for _ in range(transformer_depth)
        ])
        self.norm = nn.LayerNorm(transformer_dim)
        self.conv_proj = ConvNormAct(transformer_dim, chs, 1)
        self.conv_fusion = ConvNormAct(2 * chs, chs, 3)
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        B, C, H, W = x.shape
        p = self.patch_size
        nh, nw = math.ceil(H / p), math.ceil(W / p)
        resized = (nh * p, nw * p) != (H, W)
        if resized:
            x = F.interpolate(x, size=(nh * p, nw * p), mode="bilinear", align_corners=False)
        # Unfold: one sequence of nh*nw patches per pixel position (i, j) inside the patch.
        x = x.reshape(B, C, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1).reshape(B * p * p, nh * nw, C)
        x = self.norm(self.transformer(x))  # (B*p*p, nh*nw, C)
        x = x.reshape(B, p, p, nh, nw, C).permute(0, 5, 3, 1, 4, 2).reshape(B, C, nh * p, nw * p)  # fold
        if resized:
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        return self.conv_fusion(torch.cat([shortcut, self.conv_proj(x)], dim=1))


class MobileVit(Backbone):
    """MobileViT backbone: a stride-2 conv stem, stages of inverted residuals (the first block
    of a stage carries its stride), a MobileViT block closing each stage that has a
    ``transformer_dims`` entry, a 1x1 ``final_conv`` to ``num_features`` and a linear head.

    Per-stage tuples: ``channels``, ``depths`` (inverted residuals), ``strides``,
    ``transformer_dims`` and ``transformer_depths`` (0: no MobileViT block).
    """

    pools = ("avg", "")
    classifier_name = "head.fc"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 256,
        in_chans: int = 3,
        num_classes: int = 1000,
        stem_chs: int = 16,
        channels: tuple[int, ...] = (32, 64, 96, 128, 160),
        depths: tuple[int, ...] = (1, 3, 1, 1, 1),
        strides: tuple[int, ...] = (1, 2, 2, 2, 2),
        transformer_dims: tuple[int, ...] = (0, 0, 144, 192, 240),
        transformer_depths: tuple[int, ...] = (0, 0, 2, 4, 3),
        expand_ratio: float = 4.0,
        patch_size: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        num_features: int = 640,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        n = len(channels)
        if not all(len(t) == n for t in (depths, strides, transformer_dims, transformer_depths)):
            raise ValueError("channels, depths, strides, transformer_dims and transformer_depths need one entry per stage")
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = num_features

        self.stem = ConvNormAct(in_chans, stem_chs, 3, stride=2)
        total = sum(depths) + sum(1 for d in transformer_dims if d)
        dpr = iter([drop_path_rate * i / max(total - 1, 1) for i in range(total)])
        stages, prev, stride = [], stem_chs, 2
        self.feature_info = []
        for i in range(n):
            blocks = []
            for j in range(depths[i]):
                blocks.append(InvertedResidual(prev, channels[i], strides[i] if j == 0 else 1, expand_ratio, next(dpr)))
                prev = channels[i]
            if transformer_dims[i]:
                blocks.append(MobileVitBlock(
                    prev, transformer_dims[i], transformer_depths[i], patch_size, num_heads, mlp_ratio, next(dpr),
                ))
            stages.append(nn.Sequential(*blocks))
            stride *= strides[i]
            last = i == n - 1
            self.feature_info.append(dict(
                num_chs=num_features if last else prev, reduction=stride, module="final_conv" if last else f"stages.{i}",
            ))
        self.stages = nn.Sequential(*stages)
        self.final_conv = ConvNormAct(prev, num_features, 1)
        self.init_classifier(num_classes, drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ backbone API
    def _new_classifier(self, num_classes: int, init: bool = True, device=None) -> nn.Module:
        """The checkpoints' head init, std 0.01 (``init`` is ignored: the ctor draws it so too)."""
        if num_classes <= 0:
            return nn.Identity()
        fc = nn.Linear(self.num_features, num_classes, device=device)
        nn.init.normal_(fc.weight, std=0.01)
        nn.init.zeros_(fc.bias)
        return fc

    def group_matcher(self, coarse: bool = False) -> dict:
        return {
            "stem": r"^stem",
            "blocks": [(r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)", None), (r"^final_conv", (99999,))],
        }

    # ------------------------------------------------------------------ forward
    def _intermediates(self, x: torch.Tensor, take, norm: bool) -> tuple[torch.Tensor, list[Point]]:
        """(B, H'*W', num_features) tokens of the last map (stride 32 for the real variants), and
        the stage maps in ``take`` (the last after ``final_conv``; MobileViT has no final norm)."""
        check_image(x, self.in_chans)
        x = self.stem(x)
        last = len(self.stages) - 1
        feats = []
        for i, stage in enumerate(self.stages):
            for blk in stage:
                x = self.checkpointed(blk, x)
            if i == last:
                x = self.final_conv(x)
            if i in take:
                feats.append(Point(x))
        return map_to_tokens(x), feats


# ---------------------------------------------------------------------- variants
MOBILEVIT_PAPER = "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer (Mehta & Rastegari, 2022)"

_STRIDES = (1, 2, 2, 2, 2)
_CONFIGS = {
    "mobilevit_xxs": dict(
        channels=(16, 24, 48, 64, 80), transformer_dims=(0, 0, 64, 80, 96), expand_ratio=2.0, num_features=320,
    ),
    "mobilevit_xs": dict(channels=(32, 48, 64, 80, 96), transformer_dims=(0, 0, 96, 120, 144), num_features=384),
    "mobilevit_s": dict(channels=(32, 64, 96, 128, 160), transformer_dims=(0, 0, 144, 192, 240), num_features=640),
}
# The checkpoints were trained on [0, 1] inputs without mean/std normalisation.
_NO_NORM = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
_register = register_family("mobilevit", MobileVit, paper=MOBILEVIT_PAPER, **_NO_NORM)
for _name, _cfg in _CONFIGS.items():
    _register(
        _name, _cfg, img=256, hub_id=f"timm/{_name}.cvnets_in1k", notes="inputs in [0, 1], no mean/std normalisation",
    )
# Three stages (strides 2, 4, 8) so the last map is stride 8 on 32 px inputs.
_register(
    "test_mobilevit",
    dict(stem_chs=8, channels=(8, 16, 24), depths=(1, 1, 1), strides=(1, 2, 2), transformer_dims=(0, 0, 32),
         transformer_depths=(0, 0, 1), expand_ratio=2.0, num_heads=2, num_features=48),
    img=32, crop_pct=1.0, paper="tiny test variant", notes="for tests; not a real model",
)

__all__ = ["MobileVit", "MobileVitBlock"]
