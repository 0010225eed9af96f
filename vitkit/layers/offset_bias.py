"""Attention bias learned per head for each (|dy|, |dx|) offset between two tokens of a grid.

LeViT and EfficientFormer use it instead of position embeddings. The table is stored at the
build resolution as ``attention_biases`` (heads, H0*W0): entry dy*W0 + dx. A smaller grid uses
the part of the table it needs (exact); a larger one gets the table resampled bicubically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OffsetBias(nn.Module):
    """Learned per-head bias for each (|dy|, |dx|) offset, stored as ``attention_biases`` (heads, H0*W0)."""

    def __init__(self, num_heads: int, resolution: tuple[int, int]):
        super().__init__()
        self.resolution = resolution
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution[0] * resolution[1]))
        self._index_cache: dict = {}
        self._bias_cache: tuple = (None, None)

    def _table(self, grid: tuple[int, int]) -> torch.Tensor:
        """(heads, H, W) table of offsets 0..H-1 x 0..W-1 for a (H, W) key grid."""
        H0, W0 = self.resolution
        # Offsets a smaller grid has are all stored; only a longer side needs resampling.
        table = self.attention_biases.reshape(-1, H0, W0)[:, :grid[0], :grid[1]]
        if table.shape[1:] == grid:
            return table
        return F.interpolate(table[None], size=grid, mode="bicubic", align_corners=False)[0]

    def _index(self, grid: tuple[int, int], stride: int, device: torch.device) -> torch.Tensor:
        key = (grid, stride, str(device))
        index = self._index_cache.get(key)
        if index is None:
            H, W = grid
            ky, kx = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
            qy, qx = ky[::stride, ::stride].flatten(), kx[::stride, ::stride].flatten()
            dy = (qy[:, None] - ky.flatten()[None]).abs()
            dx = (qx[:, None] - kx.flatten()[None]).abs()
            index = dy * W + dx  # (Nq, Nk) into the flattened (H, W) table
            if not torch.compiler.is_compiling():  # a traced tensor must not outlive its trace
                self._index_cache[key] = index
        return index

    def offset_bias(self, grid: tuple[int, int], stride: int = 1) -> torch.Tensor:
        """(heads, Nq, Nk) bias for queries on every ``stride``-th token of the key grid."""
        p = self.attention_biases
        # Without autograd the gathered bias is reused until the table changes (its version
        # counter moves on every in-place update: optimizer steps, load_state_dict).
        key = (grid, stride, str(p.device), p._version)
        reuse = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if reuse and self._bias_cache[0] == key:
            return self._bias_cache[1]
        table = self._table(grid).flatten(1)  # (heads, H*W)
        bias = table[:, self._index(grid, stride, table.device)]
        if reuse:
            self._bias_cache = (key, bias)
        return bias
