"""Absolute position embeddings: learned (resampled to new grids) and fixed 2D sin-cos."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resample_abs_pos_embed(
    pos_embed: torch.Tensor,
    new_size: tuple[int, int],
    old_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a (1, prefix + H*W, C) position embedding to a new (H', W') grid.

    Prefix rows (class, distillation and register tokens) are kept aside unchanged;
    only the grid part is interpolated. ``old_size`` defaults to a square grid.
    """
    if pos_embed.ndim != 3:
        raise ValueError(f"pos_embed must be (1, N, C), got shape {tuple(pos_embed.shape)}")
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_size is None:
        side = int(math.isqrt(num_grid))
        if side * side != num_grid:
            raise ValueError(
                f"pos_embed has {num_grid} grid tokens, which is not a square; pass old_size=(H, W)"
            )
        old_size = (side, side)
    old_size = tuple(old_size)
    new_size = tuple(new_size)
    if old_size[0] * old_size[1] != num_grid:
        raise ValueError(f"old grid {old_size} does not match the {num_grid} grid tokens in pos_embed")
    if old_size == new_size:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dtype = grid.dtype
    C = grid.shape[-1]
    grid = grid.float().reshape(1, old_size[0], old_size[1], C).permute(0, 3, 1, 2)  # (1, C, H, W)
    grid = F.interpolate(grid, size=new_size, mode=interpolation, align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_size[0] * new_size[1], C).to(dtype)
    return torch.cat([prefix, grid], dim=1)


def sincos_2d_pos_embed(
    embed_dim: int, grid_size: tuple[int, int], temperature: float = 10000.0
) -> torch.Tensor:
    """Fixed 2D sin-cos embedding (MAE style): half the channels encode y, half x.

    Returns (H*W, embed_dim) in row-major grid order.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 for a 2D sin-cos embedding")
    h, w = grid_size
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    quarter = embed_dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def enc(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)  # (H*W, C/4)
        return torch.cat([out.sin(), out.cos()], dim=1)

    # x (width) first, then y, the order MAE's released weights were trained with.
    return torch.cat([enc(gx), enc(gy)], dim=1).float()
