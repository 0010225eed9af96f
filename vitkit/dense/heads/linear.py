"""The linear head: a per-patch linear classifier on the last feature map (Segmenter's linear baseline)."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ConfigError
from ..registry import register_head


@register_head("linear", tasks=("segment", "depth"))
class LinearHead(nn.Module):
    """Each position of the backbone's last (normalised) feature map goes through one Linear.

    Segmenter's ``DecoderLinear`` (Strudel et al., 2021): logits at the patch grid, which the
    dense model upsamples bilinearly to the image. ``norm="bn"`` adds a BatchNorm over the
    channels before the Linear (the linear probes of DINOv2 / BEiT); Segmenter has none.
    """

    def __init__(self, backbone: nn.Module, out_chans: int, norm: str = "none"):
        super().__init__()
        if norm not in ("none", "bn"):
            raise ConfigError(f"linear head: norm must be 'none' or 'bn', got {norm!r}")
        chans = backbone.feature_info[-1]["num_chs"]
        self.norm = nn.BatchNorm2d(chans) if norm == "bn" else nn.Identity()
        self.head = nn.Linear(chans, out_chans)
        # Segmenter's init_weights: truncated normal (0.02) weights, zero bias.
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        feat = backbone.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]  # (B, C, h, w)
        feat = self.norm(feat)
        return self.head(feat.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
