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
from torch.utils.checkpoint import checkpoint

from ..layers import Block, DropPath
from ._common import (
    BackboneMixin,
    check_image,
    check_output_fmt,
    map_to_tokens,
    register_variant,
    take_indices,
)


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


class MobileVit(BackboneMixin, nn.Module):
    """MobileViT backbone: a stride-2 conv stem, stages of inverted residuals (the first block
    of a stage carries its stride), a MobileViT block closing each stage that has a
    ``transformer_dims`` entry, a 1x1 ``final_conv`` to ``num_features`` and a linear head.

    Per-stage tuples: ``channels``, ``depths`` (inverted residuals), ``strides``,
    ``transformer_dims`` and ``transformer_depths`` (0: no MobileViT block).
    """

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
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = num_features
        self.num_prefix_tokens = 0
        self.grad_checkpointing = False

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
        self.head = _Head(num_features, num_classes, drop_rate)
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
    def no_weight_decay(self) -> set[str]:
        return set()

    def group_matcher(self, coarse: bool = False) -> dict:
        return {
            "stem": r"^stem",
            "blocks": [(r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)", None), (r"^final_conv", (99999,))],
        }

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = _Head(self.num_features, num_classes, self.head.drop.p).to(next(self.parameters()).device)

    # ------------------------------------------------------------------ forward
    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for blk in stage:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def _maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's (B, C, H, W) output; the last one after ``final_conv``."""
        check_image(x, self.in_chans)
        x = self.stem(x)
        maps = []
        for stage in self.stages:
            x = self._run_stage(stage, x)
            maps.append(x)
        maps[-1] = self.final_conv(maps[-1])
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H'*W', num_features) tokens of the last map (stride 32 for the real variants)."""
        return map_to_tokens(self._maps(x)[-1])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head.drop(x)
        return x if pre_logits else self.head.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        pyramid: bool = False,
    ):
        """Per-stage maps at the strides ``feature_info`` states (the last after ``final_conv``).

        indices select stages (an int n: the last n). Maps are (B, C, H, W) for "NCHW" or
        (B, H*W, C) for "NLC"; MobileViT has no final norm, so ``norm`` changes nothing.
        Returns ``(forward_features(x), maps)``, or only the maps.
        ``pyramid=True`` instead returns the four maps :meth:`pyramid_info` lists (strides
        4/8/16/32); ``indices`` is then ignored.
        """
        if pyramid:
            return self._pyramid_intermediates(x, norm, output_fmt, intermediates_only)
        check_output_fmt(output_fmt)
        take = take_indices(len(self.stages), indices, "stages")
        maps = self._maps(x)
        feats = [maps[i] if output_fmt == "NCHW" else map_to_tokens(maps[i]) for i in take]
        return feats if intermediates_only else (map_to_tokens(maps[-1]), feats)


class _Head(nn.Module):
    """Dropout + Linear over pooled features (``head.fc``); Identity fc when num_classes is 0."""

    def __init__(self, in_features: int, num_classes: int, drop: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)


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
for _name, _cfg in _CONFIGS.items():
    register_variant(
        MobileVit, _name, "mobilevit", _cfg, img=256, paper=MOBILEVIT_PAPER, hub_id=f"timm/{_name}.cvnets_in1k",
        notes="inputs in [0, 1], no mean/std normalisation", **_NO_NORM,
    )
# Three stages (strides 2, 4, 8) so the last map is stride 8 on 32 px inputs.
register_variant(
    MobileVit, "test_mobilevit", "mobilevit",
    dict(stem_chs=8, channels=(8, 16, 24), depths=(1, 1, 1), strides=(1, 2, 2), transformer_dims=(0, 0, 32),
         transformer_depths=(0, 0, 1), expand_ratio=2.0, num_heads=2, num_features=48),
    img=32, crop_pct=1.0, paper="tiny test variant", notes="for tests; not a real model", **_NO_NORM,
)

__all__ = ["MobileVit", "MobileVitBlock"]
