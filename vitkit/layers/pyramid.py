"""A feature pyramid from a single-scale map, for dense heads on isotropic backbones."""

from __future__ import annotations

import torch
import torch.nn.functional as F

PYRAMID_STRIDES = (4, 8, 16, 32)


def resample(x: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, C, H, W) resized by ``scale``: bilinear upsampling above 1, max pooling below, as is at 1."""
    if scale > 1:
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    if scale < 1:
        k = round(1 / scale)
        return F.max_pool2d(x, kernel_size=k, stride=k, ceil_mode=True)
    return x


def simple_pyramid(x: torch.Tensor, scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)) -> list[torch.Tensor]:
    """Maps at several scales from one (B, C, H, W) map (the simple feature pyramid of ViTDet).

    Parameter-free: bilinear upsampling for scales > 1, max pooling for scales < 1, so a plain
    ViT gives a dense head the four strides it expects; a head may add learned layers on top.
    """
    return [resample(x, s) for s in scales]


def pyramid_plan(reductions: list[int], strides: tuple[int, ...] = PYRAMID_STRIDES) -> list[tuple[int, float]]:
    """Where each pyramid level comes from: ``(i, scale)`` per stride in ``strides``.

    ``reductions`` are the strides of a backbone's maps in depth order. Each level takes the
    deepest map at exactly its stride; where the backbone has none, the deepest map of the
    nearest finer stride, max-pooled down; where there is no finer one either, the deepest map
    of the nearest coarser stride, upsampled (the simple pyramid of an isotropic model).
    ``scale`` is what :func:`resample` applies (1: the map as is).
    """
    if not reductions:
        raise ValueError("a pyramid needs at least one feature map")
    plan = []
    for s in strides:
        same = [i for i, r in enumerate(reductions) if r == s]
        finer = [i for i, r in enumerate(reductions) if r < s]
        if same:
            i = same[-1]
        elif finer:
            i = max(finer, key=lambda j: (reductions[j], j))
        else:
            i = min(range(len(reductions)), key=lambda j: (reductions[j], -j))
        plan.append((i, reductions[i] / s))
    return plan


def build_pyramid(maps: dict[int, torch.Tensor], plan: list[tuple[int, float]]) -> list[torch.Tensor]:
    """The pyramid levels of ``plan`` from ``maps`` (source index -> (B, C, H, W) map)."""
    return [resample(maps[i], scale) for i, scale in plan]
