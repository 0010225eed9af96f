"""A feature pyramid from a single-scale map, for dense heads on isotropic backbones."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def simple_pyramid(x: torch.Tensor, scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)) -> list[torch.Tensor]:
    """Maps at several scales from one (B, C, H, W) map (the simple feature pyramid of ViTDet).

    Parameter-free: bilinear upsampling for scales > 1, max pooling for scales < 1, so a plain
    ViT gives a dense head the four strides it expects; a head may add learned layers on top.
    """
    out = []
    for s in scales:
        if s > 1:
            out.append(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
        elif s < 1:
            k = round(1 / s)
            out.append(F.max_pool2d(x, kernel_size=k, stride=k, ceil_mode=True))
        else:
            out.append(x)
    return out
