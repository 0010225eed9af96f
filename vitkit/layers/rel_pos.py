"""Relative position bias for windowed attention: a learned table (Swin v1) or a log-spaced
continuous bias (Swin v2), read for any window up to the one the table was built for."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F


def relative_position_index(
    window_size: tuple[int, int], table_window: tuple[int, int] | None = None
) -> torch.Tensor:
    """(Wh*Ww, Wh*Ww) index into a table of (2*Th-1)*(2*Tw-1) relative offsets.

    ``table_window`` (default: the window itself) is the window the table was built for; a
    smaller window reads the centre of the table, i.e. the same bias per offset.
    """
    wh, ww = window_size
    th, tw = table_window or window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N): offsets in -(w-1) .. w-1
    return (rel[0] + th - 1) * (2 * tw - 1) + (rel[1] + tw - 1)


@lru_cache(maxsize=64)
def _cached_index(window_size: tuple[int, int], table_window: tuple[int, int]) -> torch.Tensor:
    return relative_position_index(window_size, table_window)


def table_bias(
    table: torch.Tensor, window_size: tuple[int, int], table_window: tuple[int, int], index: torch.Tensor | None = None
) -> torch.Tensor:
    """(heads, N, N) bias for an N = Wh*Ww window from a ((2Th-1)*(2Tw-1), heads) table.

    ``index`` is the precomputed index for ``window_size == table_window`` (a buffer, so it
    lives on the model's device); other windows use a cached one.
    """
    if index is None or tuple(window_size) != tuple(table_window):
        # Traced (torch.compile / torch.export): never cache a traced tensor.
        make = relative_position_index if torch.compiler.is_compiling() else _cached_index
        index = make(tuple(window_size), tuple(table_window)).to(table.device)
    n = window_size[0] * window_size[1]
    return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()  # (heads, N, N)


def resample_rel_pos_table(
    table: torch.Tensor, old_window: tuple[int, int], new_window: tuple[int, int]
) -> torch.Tensor:
    """Resize a ((2Wh-1)*(2Ww-1), heads) bias table to another window, bicubic per head.

    Used when weights trained at one window size load into a model with another (e.g. 7 -> 12
    for 384 px fine-tuning). Same window: returned unchanged.
    """
    old_window, new_window = tuple(old_window), tuple(new_window)
    if old_window == new_window:
        return table
    oh, ow = 2 * old_window[0] - 1, 2 * old_window[1] - 1
    nh, nw = 2 * new_window[0] - 1, 2 * new_window[1] - 1
    L, heads = table.shape
    if L != oh * ow:
        raise ValueError(f"relative bias table has {L} rows, expected {oh}x{ow} for window {old_window}")
    grid = table.float().T.reshape(1, heads, oh, ow)
    grid = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False)
    return grid.reshape(heads, nh * nw).T.contiguous().to(table.dtype)  # (nh*nw, heads)


def log_spaced_coords(window_size: tuple[int, int], norm_window: tuple[int, int]) -> torch.Tensor:
    """(2Wh-1, 2Ww-1, 2) relative offsets, scaled so ``norm_window``'s edge is 8, then log-spaced.

    sign(d) * log2(1 + |d|) / log2(8) (Swin v2): far offsets are compressed, so a bias MLP
    trained at one window extrapolates to a larger one.
    """
    axes = [
        torch.arange(-(w - 1), w, dtype=torch.float32) / max(n - 1, 1) * 8
        for w, n in zip(window_size, norm_window, strict=True)
    ]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (2Wh-1, 2Ww-1, 2)
    return torch.sign(coords) * torch.log2(coords.abs() + 1.0) / math.log2(8)
