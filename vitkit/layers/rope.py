"""2D axial rotary position embedding (RoPE) for patch tokens."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding2D(nn.Module):
    """Axial 2D RoPE: half of each head's rotary pairs encode the row, half the column.

    ``forward(grid)`` returns (sin, cos), each (H*W, head_dim), built for any grid size, so
    a model trained at one resolution runs at another without resampling anything.
    ``forward(grid, positions)`` with (B, L) flat grid indices returns (B, 1, L, head_dim)
    tables for a subset of the patches in any order (kept tokens of MAE, merged tokens).
    """

    def __init__(self, head_dim: int, theta: float = 100.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"head_dim {head_dim} must be divisible by 4 for 2D RoPE")
        quarter = head_dim // 4
        inv_freq = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float32) / quarter)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.head_dim = head_dim

    def forward(
        self, grid: tuple[int, int], positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = grid
        if positions is None:
            positions = torch.arange(h * w, device=self.inv_freq.device)
        # Integer row / column, then float: the same angles whichever subset is asked for.
        ys, xs = (positions // w).float(), (positions % w).float()
        fy = ys[..., None] * self.inv_freq  # (..., L, hd/4)
        fx = xs[..., None] * self.inv_freq
        angles = torch.cat([fy, fx], dim=-1).repeat_interleave(2, dim=-1)  # (..., L, hd), pairs share an angle
        if angles.ndim == 3:
            angles = angles[:, None]  # (B, 1, L, hd): broadcasts over heads
        return angles.sin(), angles.cos()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) on the last dim."""
    x = x.unflatten(-1, (-1, 2))
    x = torch.stack([-x[..., 1], x[..., 0]], dim=-1)
    return x.flatten(-2)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Rotate q or k of shape (B, heads, N, head_dim); prefix tokens are left unrotated.

    sin, cos: (N - prefix, head_dim) or (B, 1, N - prefix, head_dim), from RotaryEmbedding2D.
    """
    if num_prefix_tokens:
        prefix, x = x[:, :, :num_prefix_tokens], x[:, :, num_prefix_tokens:]
    sin, cos = sin.to(x.dtype), cos.to(x.dtype)
    x = x * cos + rotate_pairs(x) * sin
    return torch.cat([prefix, x], dim=2) if num_prefix_tokens else x
