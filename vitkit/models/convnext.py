"""ConvNeXt (Liu et al., 2022) and ConvNeXt V2 (Woo et al., 2023): the CNN modernised after ViT.

A 4x4 patchify stem, four stages of depthwise 7x7 conv -> LayerNorm -> inverted-bottleneck MLP
blocks with LayerScale, and LayerNorm + 2x2 conv downsampling between stages. V2 drops
LayerScale and puts Global Response Normalization inside the MLP. The small variants (atto to
nano) run the MLP as 1x1 convs on (B, C, H, W) maps instead of linears on (B, H, W, C); both
layouts compute the same function and keep their checkpoint shapes.
Parameter names follow the common checkpoint layout (``stem.0``, ``stages.N.downsample.1``,
``stages.N.blocks.M.conv_dw``, ``.mlp.fc1``, ``.gamma``, ``head.norm``, ``head.fc``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import DropPath, GlobalResponseNorm, LayerNorm2d
from ._base import Backbone, Point, check_image
from ._registry import register_family

_EPS = 1e-6


class ConvNeXtMlp(nn.Module):
    """fc1 -> GELU -> (GRN) -> fc2, as linears on channels-last input or 1x1 convs on NCHW maps."""

    def __init__(self, dim: int, hidden: int, conv: bool, grn: bool):
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.fc1 = layer(dim, hidden)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(hidden, _EPS, channels_last=not conv) if grn else nn.Identity()
        self.fc2 = layer(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.grn(self.act(self.fc1(x))))


class ConvNeXtBlock(nn.Module):
    """x + drop_path(gamma * mlp(norm(dwconv7x7(x)))) on a (B, C, H, W) map."""

    def __init__(
        self, dim: int, mlp_ratio: float = 4.0, ls_init_value: float | None = 1e-6, conv_mlp: bool = False,
        use_grn: bool = False, kernel_size: int = 7, drop_path: float = 0.0,
    ):
        super().__init__()
        self.conv_mlp = conv_mlp
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = LayerNorm2d(dim, eps=_EPS) if conv_mlp else nn.LayerNorm(dim, eps=_EPS)
        self.mlp = ConvNeXtMlp(dim, int(mlp_ratio * dim), conv_mlp, use_grn)
        # A bare parameter, not a LayerScale module, so the checkpoint key stays ``blocks.M.gamma``.
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        if self.conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)  # via (B, H, W, C)
        if self.gamma is not None:
            x = x * self.gamma.reshape(1, -1, 1, 1)
        return self.drop_path(x) + shortcut


class ConvNeXtStage(nn.Module):
    """Optional LayerNorm + 2x2 stride-2 conv downsampling, then ``depth`` blocks."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, depth: int, drop_paths: list[float], **block_kw):
        super().__init__()
        if stride > 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(LayerNorm2d(in_chs, eps=_EPS), nn.Conv2d(in_chs, out_chs, stride, stride))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(out_chs, drop_path=drop_paths[i], **block_kw) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt(Backbone):
    """ConvNeXt V1 (LayerScale) or V2 (``use_grn=True, ls_init_value=None``) with a classification head
    (average pool -> LayerNorm -> dropout -> fc, pooling before the norm, as trained)."""

    pools = ("avg",)
    classifier_name = "head.fc"

    def __init__(
        self,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        patch_size: int = 4,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = 1e-6,
        conv_mlp: bool = False,
        use_grn: bool = False,
        head_init_scale: float = 1.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        img_size: int | tuple[int, int] | None = None,
    ):
        super().__init__()
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"depths {tuple(depths)} and dims {tuple(dims)} must have the same, non-zero length")
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.img_size = img_size  # recorded for the card; a CNN takes any input size

        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], patch_size, patch_size), LayerNorm2d(dims[0], eps=_EPS))
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # stochastic depth grows with depth
        stages, in_chs, reduction, start = [], dims[0], patch_size, 0
        self.feature_info = []
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            stages.append(ConvNeXtStage(
                in_chs, dim, stride, depth, rates[start:start + depth], mlp_ratio=mlp_ratio,
                ls_init_value=ls_init_value, conv_mlp=conv_mlp, use_grn=use_grn, kernel_size=kernel_size,
            ))
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{i}"))
            in_chs, start = dim, start + depth
        self.stages = nn.Sequential(*stages)
        self.num_features = in_chs
        self.init_classifier(num_classes, drop_rate, head_norm=nn.LayerNorm(in_chs, eps=_EPS))
        self._init_weights(head_init_scale)

    def _init_weights(self, head_init_scale: float) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if isinstance(self.head.fc, nn.Linear):
            with torch.no_grad():
                self.head.fc.weight.mul_(head_init_scale)
                self.head.fc.bias.mul_(head_init_scale)

    def _intermediates(self, x: torch.Tensor, take, norm: bool) -> tuple[torch.Tensor, list[Point]]:
        check_image(x, self.in_chans)
        first, *rest = self.stages
        feats = []
        for i, step in enumerate([lambda x: first(self.stem(x)), *rest]):
            x = self.checkpointed(step, x)
            if i in take:
                feats.append(Point(x))
        return x, feats

    # ------------------------------------------------------------------ backbone API
    def group_matcher(self, coarse: bool = False) -> dict:
        if coarse:
            return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}
        return {
            "stem": r"^stem",
            "blocks": [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)],
        }


# ---------------------------------------------------------------------- variants
CONVNEXT_PAPER = "A ConvNet for the 2020s (Liu et al., 2022)"
CONVNEXTV2_PAPER = "ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders (Woo et al., 2023)"

# name: (depths, dims); the small ones run the MLP as 1x1 convs, as their checkpoints were trained.
_SIZES = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}
_CONV_MLP = ("atto", "femto", "pico", "nano")
_V1_HUB = {
    "atto": "d2_in1k", "femto": "d1_in1k", "pico": "d1_in1k", "nano": "in12k_ft_in1k", "tiny": "in12k_ft_in1k",
    "small": "in12k_ft_in1k", "base": "fb_in22k_ft_in1k", "large": "fb_in22k_ft_in1k",
}


_register = register_family("convnext", ConvNeXt)


for _size, (_depths, _dims) in _SIZES.items():
    _cfg = dict(depths=_depths, dims=_dims, conv_mlp=_size in _CONV_MLP)
    _register(
        f"convnext_{_size}", _cfg, crop_pct=0.95, paper=CONVNEXT_PAPER,
        hub_id=f"timm/convnext_{_size}.{_V1_HUB[_size]}",
    )
    _register(
        f"convnextv2_{_size}", dict(_cfg, use_grn=True, ls_init_value=None), crop_pct=0.875, paper=CONVNEXTV2_PAPER,
        hub_id=None if _size == "small" else f"timm/convnextv2_{_size}.fcmae_ft_in1k",  # no published V2-S
    )

_TEST = dict(depths=(1, 1), dims=(16, 32))
_TEST_CARD = dict(img=32, crop_pct=1.0, paper="tiny test variant", notes="for tests; not a real model")
_register("test_convnext", _TEST, **_TEST_CARD)
_register("test_convnextv2", dict(_TEST, use_grn=True, ls_init_value=None, conv_mlp=True), **_TEST_CARD)

__all__ = ["ConvNeXt"]
