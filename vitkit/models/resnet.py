"""ResNet (He et al., 2016): the convolutional baseline and the DeiT paper's teacher family.

Parameter names are the common torchvision / timm layout (``conv1``, ``bn1``, ``layerN.M.conv1``,
``layerN.M.downsample.0``, ``fc``), so those checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import DropPath
from ._base import Backbone, Point, check_image
from ._registry import register_family


def _downsample(in_chs: int, out_chs: int, stride: int) -> nn.Module:
    """1x1 conv + BN on the shortcut when the residual changes width or resolution."""
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_chs, out_chs, stride) if stride != 1 or in_chs != out_chs else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(self.drop_path(x) + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4 (ResNet-50 and deeper)."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_chs, out_chs, stride) if stride != 1 or in_chs != out_chs else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(self.drop_path(x) + shortcut)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(Backbone):
    """ResNet: 7x7/2 conv stem, 3x3/2 max pool, residual stages (the first at stride 1), avg pool, fc.

    ``feature_info`` lists the stem (stride 2, before the pool) and every stage, as dense heads expect.
    """

    pools = ("avg",)
    classifier_name = "fc"
    classifier_init_std = None

    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        block: str = "basic",
        channels: tuple[int, ...] = (64, 128, 256, 512),
        stem_width: int = 64,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = True,
        img_size: int | tuple[int, int] | None = None,
    ):
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f"unknown block {block!r}; choose one of {sorted(_BLOCKS)}")
        if len(layers) != len(channels) or not layers:
            raise ValueError(f"layers {tuple(layers)} and channels {tuple(channels)} must have the same, non-zero length")
        block_cls = _BLOCKS[block]
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        # img_size only records what the card says; a CNN takes any input size.
        self.img_size = img_size

        self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=stem_width, reduction=2, module="act1")]

        total, done = sum(layers), 0
        in_chs, reduction = stem_width, 4
        for i, (n, planes) in enumerate(zip(layers, channels)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(n):
                dpr = drop_path_rate * done / max(total - 1, 1)  # stochastic depth grows with depth
                blocks.append(block_cls(in_chs, planes, stride if j == 0 else 1, dpr))
                in_chs = planes * block_cls.expansion
                done += 1
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"layer{i + 1}"))
        self.num_features = in_chs
        self.init_classifier(num_classes, drop_rate)
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            # Each residual branch starts as zero, so the untrained network is a chain of identities.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def _layers(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i}") for i in range(1, len(self.feature_info))]

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def _intermediates(self, x: torch.Tensor, take, norm: bool) -> tuple[torch.Tensor, list[Point]]:
        check_image(x, self.in_chans)
        first, *rest = self._layers()
        feats = []
        for i, step in enumerate([self._stem, lambda x: first(self.maxpool(x)), *rest]):
            x = self.checkpointed(step, x)
            if i in take:
                feats.append(Point(x))
        return x, feats

    # ------------------------------------------------------------------ backbone API
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"}


# ---------------------------------------------------------------------- variants
RESNET_PAPER = "Deep Residual Learning for Image Recognition (He et al., 2016)"
_VARIANTS = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
    "resnet101": ((3, 4, 23, 3), "bottleneck"),
    "resnet152": ((3, 8, 36, 3), "bottleneck"),
}


_register = register_family("resnet", ResNet)


for _name, (_layers, _block) in _VARIANTS.items():
    _register(
        _name, dict(layers=_layers, block=_block), crop_pct=0.95, paper=RESNET_PAPER,
        hub_id=f"timm/{_name}.a1_in1k",
    )

_register(
    "test_resnet", dict(layers=(1, 1), channels=(16, 32), stem_width=16, zero_init_last=False), img=32,
    crop_pct=1.0, paper="tiny test variant", notes="for tests; not a real model",
)

__all__ = ["ResNet"]
