"""Relative position bias for windowed attention (a learned bias per head and offset)."""

from __future__ import annotations

import torch
from torch import nn


def relative_position_index(window_size: tuple[int, int]) -> torch.Tensor:
    """(Wh*Ww, Wh*Ww) index into a table of (2*Wh-1)*(2*Ww-1) relative offsets."""
    wh, ww = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    rel = rel.permute(1, 2, 0)
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    return rel[:, :, 0] * (2 * ww - 1) + rel[:, :, 1]


class RelativePositionBias(nn.Module):
    """Returns an additive attention bias of shape (heads, N, N) for an N = Wh*Ww window."""

    def __init__(self, window_size: tuple[int, int], num_heads: int):
        super().__init__()
        self.window_size = tuple(window_size)
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)

    def forward(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()  # (heads, N, N)
