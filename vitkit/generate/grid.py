"""A grid of images in one PNG: how samples are looked at (``vitkit sample``, each evaluation, the benchmark)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DataError

MIN_TILE = 64  # pixels: smaller images are enlarged (nearest neighbour) to at least this side


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> uint8 (N, H, W, C), clamped, rounded to the nearest level."""
    x = images.detach().to("cpu", torch.float32).clamp(-1, 1)
    return np.ascontiguousarray(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, *, scale: int | None = None,
              padding: int = 2, pad_value: float = 1.0) -> Path:
    """Write ``images`` (N, C, H, W) in [-1, 1] (C = 1 grey or 3 RGB) as one PNG grid; returns its path.

    Args:
        nrow: images per row (default: ceil(sqrt(N)), a square grid); the last row may be partial.
        scale: integer enlargement of each image (nearest neighbour, so pixels stay sharp); None:
            the smallest that makes a tile at least 64 px (3 for 28 px samples), 1 for larger ones.
        padding: pixels between tiles and around the grid.
        pad_value: the colour of the padding, in [-1, 1] (default white).

    The PNG is ``ncol * (scale * W + padding) + padding`` wide and ``nrows * (scale * H + padding)
    + padding`` high.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"save_grid writes PNG files: name it *.png, got {path.name}")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"save_grid takes a (N, C, H, W) tensor with C = 1 or 3; got {shape}")
    n, c, h, w = images.shape
    if n == 0:
        raise DataError("save_grid got no images")
    if nrow is not None and nrow < 1:
        raise ConfigError(f"nrow is the number of images per row, at least 1; got {nrow}")
    if scale is not None and scale < 1:
        raise ConfigError(f"scale must be a positive integer; got {scale}")
    ncol = min(n, nrow or math.ceil(math.sqrt(n)))
    rows = math.ceil(n / ncol)
    s = scale or max(1, math.ceil(MIN_TILE / max(h, w)))
    th, tw = s * h, s * w
    tiles = to_uint8(images).repeat(s, axis=1).repeat(s, axis=2)  # (N, s*H, s*W, C)
    fill = int(round((min(max(pad_value, -1.0), 1.0) + 1) * 127.5))
    sheet = np.full((rows * (th + padding) + padding, ncol * (tw + padding) + padding, c), fill, np.uint8)
    for k in range(n):
        y, x = padding + (k // ncol) * (th + padding), padding + (k % ncol) * (tw + padding)
        sheet[y:y + th, x:x + tw] = tiles[k]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet[..., 0] if c == 1 else sheet).save(path, format="PNG")  # uint8 (H, W): L, (H, W, 3): RGB
    return path


__all__ = ["save_grid", "to_uint8"]
