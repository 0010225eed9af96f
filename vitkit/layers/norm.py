"""Normalisation layers: LayerNorm, RMSNorm, and LayerNorm2d for (B, C, H, W) maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LayerNorm = nn.LayerNorm


class RMSNorm(nn.Module):
    """x / rms(x) * weight, over the last dim (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.normalized_shape = (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def get_norm_layer(name: str | type[nn.Module]) -> type[nn.Module]:
    """'layernorm' | 'rmsnorm' (or a class) -> a constructor taking the dim."""
    if not isinstance(name, str):
        return name
    table = {"layernorm": _layernorm_eps6, "rmsnorm": RMSNorm}
    if name.lower() not in table:
        raise ValueError(f"unknown norm_layer {name!r}; choose one of {sorted(table)}")
    return table[name.lower()]


def _layernorm_eps6(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)
