"""UperNet (Xiao et al., 2018) on a backbone's 4-level pyramid, as mmsegmentation's UPerHead."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ConfigError
from ..layers import ConvBNReLU, resize, seg_classifier
from ..registry import register_head


class PPM(nn.ModuleList):
    """Pyramid pooling (PSPNet): average-pool to each scale, 1x1 conv-norm-ReLU, upsample back."""

    def __init__(self, pool_scales: tuple[int, ...], in_chs: int, channels: int, norm: str):
        super().__init__(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_chs, channels, 1, norm)) for s in pool_scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [resize(stage(x), x.shape[-2:]) for stage in self]


@register_head("upernet", tasks=("segment", "depth"))
class UperNetHead(nn.Module):
    """UperNet: a pyramid pooling module on the top level, an FPN (1x1 laterals, top-down
    addition, 3x3 convs) on the others, the four levels upsampled to the finest (stride 4),
    concatenated, fused by a 3x3 conv and classified after dropout 0.1.

    Input: ``forward_intermediates(pyramid=True)`` (Swin's, PVT's, ConvNeXt's stages, or a
    plain ViT's simple pyramid). ``channels`` is 512 in the paper's configs; smaller values
    make a light head. ``norm`` is the conv norm ("bn" = the references' SyncBN on one process).
    """

    requires_pyramid = True

    def __init__(self, backbone: nn.Module, out_chans: int, channels: int = 512,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6), norm: str = "bn", dropout: float = 0.1):
        super().__init__()
        if channels < 1 or not pool_scales or any(s < 1 for s in pool_scales):
            raise ConfigError(f"upernet: channels must be >= 1 and pool_scales positive, got {channels}, {pool_scales}")
        in_chs = [f["num_chs"] for f in backbone.pyramid_info()]
        self.pool_scales = tuple(pool_scales)
        self.psp_modules = PPM(tuple(pool_scales), in_chs[-1], channels, norm)
        self.bottleneck = ConvBNReLU(in_chs[-1] + len(pool_scales) * channels, channels, 3, norm)
        self.lateral_convs = nn.ModuleList([ConvBNReLU(c, channels, 1, norm) for c in in_chs[:-1]])
        self.fpn_convs = nn.ModuleList([ConvBNReLU(channels, channels, 3, norm) for _ in in_chs[:-1]])
        self.fpn_bottleneck = ConvBNReLU(len(in_chs) * channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = seg_classifier(channels, out_chans)

    def fuse(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Pyramid maps (finest first) -> the fused (B, channels, h/4, w/4) map before the classifier."""
        top = feats[-1]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        return self.fpn_bottleneck(torch.cat([resize(o, size) for o in outs], dim=1))

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Four maps at strides 4, 8, 16, 32 (finest first, channels as built) -> (B, out_chans,
        h/4, w/4) logits. ``forward`` decodes the backbone's pyramid; a head that builds its own
        pyramid (ViT-Adapter) calls this on its maps."""
        if (self.training and feats[0].shape[0] == 1 and 1 in self.pool_scales
                and isinstance(self.bottleneck.norm, nn.BatchNorm2d)):
            raise ConfigError(
                "upernet's pyramid pooling normalises a 1x1 map with BatchNorm, which needs a training batch of "
                "2 or more: raise the batch size or use head_args {norm: gn} (vit_adapter: {decoder_norm: gn})"
            )
        return self.conv_seg(self.dropout(self.fuse(feats)))

    def forward(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.decode(backbone.forward_intermediates(x, pyramid=True, norm=True, intermediates_only=True))
