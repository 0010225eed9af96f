"""SETR's decoders (Zheng et al., 2021): naive, progressive upsampling (PUP) and multi-level
feature aggregation (MLA), as mmsegmentation's SETRUPHead, MLANeck and SETRMLAHead configure them.

SETR trains with auxiliary heads on intermediate layers; they are training-time extras outside
the decoder and are not built here.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ConfigError
from ..layers import ConvBNReLU, channel_layer_norm, seg_classifier
from ..registry import register_head


def evenly_spaced_layers(depth: int, n: int = 4) -> list[int]:
    """``n`` evenly spaced feature points ending at the last: (5, 11, 17, 23) of 24 blocks, as
    SETR-MLA takes them; a model shallower than ``n`` repeats points."""
    return [max(0, depth * (k + 1) // n - 1) for k in range(n)]


class _Upsample(nn.Module):
    """Bilinear upsampling by a fixed factor (mmseg's ``Upsample``, half-pixel centres)."""

    def __init__(self, scale: int):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)


@register_head("setr_pup", tasks=("segment", "depth"))
class SETRUpHead(nn.Module):
    """SETR-PUP: the last layer's tokens, LayerNorm, then ``num_convs`` stages of conv-norm-ReLU
    and x``up_scale`` bilinear upsampling (4 x2 stages, 256 channels: a 16-pixel patch grid back
    to full resolution), then the 1x1 classifier.

    ``layer`` picks the feature point (the last by default, SETR's ``in_index=3`` of
    out_indices (9, 14, 19, 23)); it is read without the backbone's final norm, since the head
    has its own. ``norm`` is the conv norm ("bn" = SETR's SyncBN on one process).
    """

    defaults = dict(channels=256, num_convs=4, up_scale=2, kernel_size=3)

    def __init__(self, backbone: nn.Module, out_chans: int, channels: int | None = None, num_convs: int | None = None,
                 up_scale: int | None = None, kernel_size: int | None = None, layer: int = -1, norm: str = "bn",
                 dropout: float = 0.0):
        super().__init__()
        d = self.defaults
        channels = d["channels"] if channels is None else channels
        num_convs = d["num_convs"] if num_convs is None else num_convs
        up_scale = d["up_scale"] if up_scale is None else up_scale
        kernel_size = d["kernel_size"] if kernel_size is None else kernel_size
        if kernel_size not in (1, 3) or num_convs < 1 or up_scale < 1:
            raise ConfigError(
                f"SETR up head: kernel_size must be 1 or 3, num_convs and up_scale >= 1; got {kernel_size}, "
                f"{num_convs}, {up_scale}"
            )
        n = len(backbone.feature_info)
        if not -n <= layer < n:
            raise ConfigError(f"SETR up head: layer {layer} is out of range for a backbone with {n} feature points")
        self.layer = layer % n
        in_chs = backbone.feature_info[self.layer]["num_chs"]
        self.norm = nn.LayerNorm(in_chs, eps=1e-6)
        convs = []
        for i in range(num_convs):
            convs.append(nn.Sequential(ConvBNReLU(in_chs if i == 0 else channels, channels, kernel_size, norm),
                                       _Upsample(up_scale)))
        self.up_convs = nn.ModuleList(convs)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = seg_classifier(channels, out_chans)

    def forward(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        feat = backbone.forward_intermediates(x, indices=[self.layer], norm=False, intermediates_only=True)[0]
        feat = channel_layer_norm(feat, self.norm)
        for up in self.up_convs:
            feat = up(feat)
        return self.conv_seg(self.dropout(feat))


@register_head("setr_naive", tasks=("segment", "depth"))
class SETRNaiveHead(SETRUpHead):
    """SETR-Naive: LayerNorm, one 1x1 conv-norm-ReLU, x4 bilinear upsampling, the 1x1 classifier
    (mmseg's SETRUPHead with num_convs=1, kernel_size=1, up_scale=4, channels=256)."""

    defaults = dict(channels=256, num_convs=1, up_scale=4, kernel_size=1)


@register_head("setr_mla", tasks=("segment", "depth"))
class SETRMLAHead(nn.Module):
    """SETR-MLA: four evenly spaced layers, each LayerNorm'd and projected by a 1x1 conv (256
    channels); a top-down aggregation (each stream plus all deeper ones) and a 3x3 conv per
    stream (the MLA neck); then per stream two 3x3 convs to ``mla_channels`` (128) and x4
    bilinear upsampling; the four streams concatenated and classified by a 1x1 conv.

    The layers must share one stride (a plain ViT); ``layers`` overrides which feature points.
    """

    def __init__(self, backbone: nn.Module, out_chans: int, layers: list[int] | None = None, neck_channels: int = 256,
                 mla_channels: int = 128, up_scale: int = 4, norm: str = "bn", dropout: float = 0.0):
        super().__init__()
        n = len(backbone.feature_info)
        layers = evenly_spaced_layers(n) if layers is None else list(layers)
        if not layers or any(not -n <= i < n for i in layers):
            raise ConfigError(f"SETR-MLA: layers {layers} must be feature points of the backbone (0..{n - 1})")
        self.layers = [i % n for i in layers]
        info = [backbone.feature_info[i] for i in self.layers]
        if len({str(f["reduction"]) for f in info}) > 1:
            raise ConfigError(
                f"SETR-MLA aggregates feature points of one stride (a plain ViT); {type(backbone).__name__}'s "
                f"points {self.layers} have strides {[f['reduction'] for f in info]}. Use model.head=upernet "
                "for a hierarchical backbone"
            )
        self.norm = nn.ModuleList([nn.LayerNorm(f["num_chs"], eps=1e-6) for f in info])
        self.channel_proj = nn.ModuleList([ConvBNReLU(f["num_chs"], neck_channels, 1, norm) for f in info])
        self.feat_extract = nn.ModuleList([ConvBNReLU(neck_channels, neck_channels, 3, norm) for _ in info])
        self.up_convs = nn.ModuleList([
            nn.Sequential(ConvBNReLU(neck_channels, mla_channels, 3, norm), ConvBNReLU(mla_channels, mla_channels, 3, norm),
                          _Upsample(up_scale))
            for _ in info
        ])
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = seg_classifier(len(info) * mla_channels, out_chans)

    def aggregate(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The MLA neck: per-stream norm and projection, top-down sums (deepest first), 3x3 convs.
        Returns the streams deepest first."""
        proj = [p(channel_layer_norm(f, ln)) for f, ln, p in zip(feats, self.norm, self.channel_proj)]
        mids, acc = [], None
        for p in reversed(proj):
            acc = p if acc is None else acc + p
            mids.append(acc)
        return [conv(m) for m, conv in zip(mids, self.feat_extract)]

    def forward(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        take = sorted(set(self.layers))
        maps = dict(zip(take, backbone.forward_intermediates(x, indices=take, norm=False, intermediates_only=True)))
        streams = self.aggregate([maps[i] for i in self.layers])
        out = torch.cat([up(s) for s, up in zip(streams, self.up_convs)], dim=1)
        return self.conv_seg(self.dropout(out))
