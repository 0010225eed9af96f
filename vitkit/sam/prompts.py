"""Prompts drawn from instance masks, as SAM trains and evaluates with them.

Every function takes one mask (H, W) or a stack (N, H, W) of bool masks and returns one prompt
per mask. Coordinates are ``(x, y)`` pixel indices in the mask's frame (the prompt encoder adds
the half-pixel shift); boxes are ``(x0, y0, x1, y1)`` with ``x1``/``y1`` the last pixel of the
mask, as SAM's ``batched_mask_to_box``. Random draws come from a CPU ``torch.Generator`` and are
then used on the masks' device, so a seeded generator gives the same prompts on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["center_point", "distance_transform", "error_point", "mask_box", "sample_point"]


def _stack(mask: Tensor) -> tuple[Tensor, bool]:
    if mask.ndim not in (2, 3):
        raise ValueError(f"masks must be (H, W) or (N, H, W), got shape {tuple(mask.shape)}")
    return (mask[None] if mask.ndim == 2 else mask).bool(), mask.ndim == 2


def _uniform_pixel(region: Tensor, generator: torch.Generator | None) -> Tensor:
    """(N, 2) float (x, y) of a pixel drawn uniformly from each region (N, H, W); (-1, -1) where empty."""
    n, h, w = region.shape
    flat = region.reshape(n, -1)
    count = flat.sum(1)
    u = torch.rand(n, generator=generator).to(region.device)
    k = (u * count).long().clamp_max((count - 1).clamp_min(0))
    # The k-th True pixel (0-based): the first position whose running count exceeds k.
    idx = torch.searchsorted(flat.long().cumsum(1), (k + 1)[:, None]).squeeze(1).clamp_max(h * w - 1)
    xy = torch.stack([idx % w, idx // w], 1).float()
    return torch.where((count > 0)[:, None], xy, torch.full_like(xy, -1.0))


def sample_point(mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A point drawn uniformly inside each mask (a foreground click, label 1): (2,) or (N, 2) float (x, y).

    An empty mask gives (-1, -1), which callers pass with label -1 (no point)."""
    m, single = _stack(mask)
    xy = _uniform_pixel(m, generator)
    return xy[0] if single else xy


def mask_box(mask: Tensor, noise: float = 0.1, max_noise: float = 20.0,
             generator: torch.Generator | None = None) -> Tensor:
    """The tight box of each mask, each coordinate moved by SAM's training noise: (4,) or (N, 4) float xyxy.

    The noise of a coordinate is normal with a standard deviation of ``noise`` times the box's
    side along its axis, clipped to +-``max_noise`` pixels (SAM: 10% of the side, at most 20 px);
    the noisy box is clipped to the image. ``noise=0`` gives the tight box. An empty mask gives
    (0, 0, 0, 0).
    """
    m, single = _stack(mask)
    n, h, w = m.shape
    rows, cols = m.any(2), m.any(1)  # (N, H), (N, W)
    ar_h = torch.arange(h, device=m.device)
    ar_w = torch.arange(w, device=m.device)
    y0 = torch.where(rows, ar_h, h).min(1).values
    y1 = torch.where(rows, ar_h, -1).max(1).values
    x0 = torch.where(cols, ar_w, w).min(1).values
    x1 = torch.where(cols, ar_w, -1).max(1).values
    box = torch.stack([x0, y0, x1, y1], 1).float()
    empty = ~rows.any(1)
    box[empty] = 0.0
    if noise > 0:
        side = torch.stack([x1 - x0, y1 - y0, x1 - x0, y1 - y0], 1).float().clamp_min(0)
        eps = torch.randn(n, 4, generator=generator).to(m.device)
        box = box + (eps * noise * side).clamp(-max_noise, max_noise)
        box[:, 0::2] = box[:, 0::2].clamp(0, w - 1)
        box[:, 1::2] = box[:, 1::2].clamp(0, h - 1)
        box[empty] = 0.0
    return box[0] if single else box


def distance_transform(mask: Tensor) -> Tensor:
    """Exact Euclidean distance of each pixel of ``mask`` (N, H, W) to the nearest pixel outside it.

    The image is taken as padded by one background pixel all round (as SAM's evaluation pads
    before OpenCV's distance transform), so the border counts as boundary. Background pixels
    are 0. Two passes: the distance along each column, then the lower envelope along each row.
    """
    m, single = _stack(mask)
    n, h, w = m.shape
    ys = torch.arange(h, device=m.device).view(1, h, 1).expand(n, h, w)
    # Nearest background row at or above / at or below each pixel (the padding rows at -1 and h).
    above = torch.where(m, torch.full_like(ys, -1), ys).cummax(1).values
    below = torch.where(m, torch.full_like(ys, h), ys).flip(1).cummin(1).values.flip(1)
    g = torch.minimum(ys - above, below - ys).float()  # (N, H, W) column distance
    xs = torch.arange(w, device=m.device, dtype=torch.float32)
    dx2 = (xs[:, None] - xs[None, :]).square()  # (W, W): [x, x']
    edge = torch.minimum(xs + 1, w - xs).square()  # the padding columns at -1 and w
    out = torch.empty(n, h, w, device=m.device)
    rows = max(1, (1 << 22) // max(w * w, 1))  # bound the (rows, W, W) temporary
    flat = g.square().reshape(n * h, w)
    res = out.view(n * h, w)
    for s in range(0, n * h, rows):
        d2 = (flat[s:s + rows, None, :] + dx2[None]).amin(2)
        res[s:s + rows] = torch.minimum(d2, edge[None]).sqrt()
    out = out * m
    return out[0] if single else out


def center_point(mask: Tensor) -> Tensor:
    """The pixel of each mask farthest from its boundary (SAM's evaluation click): (2,) or (N, 2) float (x, y).

    Ties go to the first pixel in raster order; an empty mask gives (-1, -1)."""
    m, single = _stack(mask)
    n, h, w = m.shape
    dist = distance_transform(m).reshape(n, -1)
    idx = dist.argmax(1)
    xy = torch.stack([idx % w, idx // w], 1).float()
    xy[~m.reshape(n, -1).any(1)] = -1.0
    return xy[0] if single else xy


def error_point(pred: Tensor, gt: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """A correction click drawn uniformly from the error region of each prediction (SAM's training).

    Returns ``(coords (N, 2) float (x, y), labels (N,) int64)``: label 1 where the pixel is a false
    negative (in ``gt``, missed), 0 where it is a false positive. Where the prediction is exact
    there is nothing to correct: the point is (-1, -1) with label -1 (not a point). Single
    masks give (2,) and a 0-d label.
    """
    p, single = _stack(pred)
    g, _ = _stack(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and ground truth {tuple(g.shape)} differ in shape")
    xy = _uniform_pixel(p ^ g, generator)
    n = xy.shape[0]
    found = xy[:, 0] >= 0
    x, y = xy[:, 0].long().clamp_min(0), xy[:, 1].long().clamp_min(0)
    fg = g[torch.arange(n, device=g.device), y, x]
    labels = torch.where(found, fg.long(), torch.full_like(fg, -1, dtype=torch.long))
    return (xy[0], labels[0]) if single else (xy, labels)
