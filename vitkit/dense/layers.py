"""Building blocks shared by the dense heads: conv-norm-ReLU units, the classifier, resizing."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

CONV_NORMS = ("bn", "gn", "none")


def conv_norm(norm: str, channels: int) -> nn.Module:
    """The normalisation after a conv: BatchNorm ("bn", the references' SyncBN on one process),
    GroupNorm with up to 32 groups ("gn", for batches too small for batch statistics) or none."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ConfigError(f"unknown conv norm {norm!r}: choose one of {CONV_NORMS}")


class ConvBNReLU(nn.Module):
    """Conv2d -> norm -> ReLU, padded to keep the size (mmcv's ConvModule with its default init).

    The conv has a bias only when there is no norm (a norm's shift makes it redundant).
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, norm: str = "bn", act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=norm == "none")
        self.norm = conv_norm(norm, out_chs)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()
        # Kaiming (fan-out, ReLU gain), as ConvModule initialises the convs of mmseg's heads.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


def seg_classifier(in_chs: int, out_chans: int) -> nn.Conv2d:
    """The 1x1 conv that maps decoder features to classes (or depth), drawn N(0, 0.01) with a
    zero bias as mmseg's decode heads draw ``conv_seg``."""
    conv = nn.Conv2d(in_chs, out_chans, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (B, C, h, w) map to ``size`` (half-pixel centres, align_corners=False)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def channel_layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """A LayerNorm over the channels of a (B, C, H, W) map, as on the (B, H*W, C) tokens it came from."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


__all__ = ["CONV_NORMS", "ConvBNReLU", "channel_layer_norm", "conv_norm", "resize", "seg_classifier"]
