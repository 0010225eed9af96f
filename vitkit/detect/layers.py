"""Pieces the DETR family shares: 2D sine positions over the real pixels and the box MLP."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sine_positions(mask: Tensor, num_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                   scale: float = 2 * math.pi, offset: float = 0.0) -> Tensor:
    """DETR's 2D sine position embedding (B, 2 * num_feats, h, w) of a feature map.

    ``mask`` (B, h, w) is True on real (unpadded) positions: coordinates count real positions
    only, so padding does not shift them. With ``normalize`` they are scaled to ``[0, scale]`` by
    the real extent of each image; Deformable DETR subtracts ``offset=0.5`` first (pixel centres).
    Channels are (y, x), each interleaving sin and cos.
    """
    m = mask.float()
    y = m.cumsum(1)
    x = m.cumsum(2)
    if normalize:
        eps = 1e-6
        y = (y - offset) / (y[:, -1:, :] + eps) * scale
        x = (x - offset) / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, device=mask.device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    px = x[..., None] / dim_t
    py = y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box and class FFNs); keys ``layers.i``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip([in_dim] + dims, dims + [out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x
