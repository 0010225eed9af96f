"""Global Response Normalization (ConvNeXt V2, Woo et al., 2023)."""

from __future__ import annotations

import torch
from torch import nn


class GlobalResponseNorm(nn.Module):
    """x + weight * (x * n(x)) + bias, with n(x) = ||x||_spatial / mean_channels(||x||_spatial).

    Channels compete through the divisive normalisation, which counters the feature collapse
    ConvNeXt V2 found in masked-autoencoder pretraining. ``weight`` and ``bias`` start at zero,
    so the layer starts as the identity. ``channels_last``: (B, H, W, C) input, else (B, C, H, W).
    """

    def __init__(self, dim: int, eps: float = 1e-6, channels_last: bool = True):
        super().__init__()
        self.eps = eps
        self.channels_last = channels_last
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial, channel = ((1, 2), -1) if self.channels_last else ((2, 3), 1)
        shape = (1, 1, 1, -1) if self.channels_last else (1, -1, 1, 1)
        gx = x.norm(p=2, dim=spatial, keepdim=True)  # (B, 1, 1, C) or (B, C, 1, 1)
        nx = gx / (gx.mean(dim=channel, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias.view(shape), self.weight.view(shape), x * nx)
