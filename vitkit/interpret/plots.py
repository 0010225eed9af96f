"""Figures for the interpretation maps, drawn on a private Agg canvas.

Nothing here imports ``matplotlib.pyplot``, so the global backend and any open figures of
the caller are untouched. Each function returns a :class:`~matplotlib.figure.Figure`; save it
with :func:`save_png` or turn it into an RGB array with :func:`to_array` (for a web app).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _hwc(image) -> np.ndarray:
    """uint8 (C, H, W) tensor, (H, W[, C]) array or PIL image -> uint8 (H, W, 3)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = image.permute(1, 2, 0).numpy() if image.ndim == 3 else image.numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255 if arr.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr[..., :3]


def upsample(heat: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(H', W') map -> (H, W) float array, bilinear, scaled to [0, 1]."""
    h = F.interpolate(heat.detach().float().cpu()[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    h = h - h.min()
    return (h / h.max().clamp_min(1e-12)).numpy()


def _overlay(ax, image: np.ndarray, heat: torch.Tensor | None, title: str = "", alpha: float = 0.5) -> None:
    ax.imshow(image)
    if heat is not None:
        ax.imshow(upsample(heat, image.shape[:2]), cmap="jet", alpha=alpha, vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def overlay_figure(image, heat: torch.Tensor, title: str = "") -> Figure:
    """The image, and the map (H', W') upsampled over it."""
    image = _hwc(image)
    fig = _figure(6, 3.2)
    axes = fig.subplots(1, 2)
    _overlay(axes[0], image, None, "input")
    _overlay(axes[1], image, heat, title)
    fig.tight_layout()
    return fig


def heads_figure(image, maps: torch.Tensor, masks: torch.Tensor | None = None, title: str = "") -> Figure:
    """One panel per head: the map over the image, with the outline of its top-mass mask."""
    image = _hwc(image)
    heads = maps.shape[0]
    cols = min(heads, 4)
    rows = math.ceil(heads / cols)
    fig = _figure(2.4 * cols, 2.5 * rows + 0.3)
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    for h, ax in enumerate(axes):
        if h >= heads:
            ax.axis("off")
            continue
        _overlay(ax, image, maps[h], f"head {h}")
        if masks is not None:
            m = F.interpolate(masks[h].float()[None, None].cpu(), size=image.shape[:2], mode="nearest")[0, 0]
            ax.contour(m.numpy(), levels=[0.5], colors="white", linewidths=1.2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def pos_embed_figure(sim: torch.Tensor) -> Figure:
    """The (H', W', H', W') similarity grid: at grid cell (i, j), the similarity map of patch (i, j)."""
    H, W = sim.shape[:2]
    fig = _figure(min(0.5 * W + 1, 12), min(0.5 * H + 0.6, 12))
    axes = np.array(fig.subplots(H, W, squeeze=False))
    for i in range(H):
        for j in range(W):
            ax = axes[i, j]
            im = ax.imshow(sim[i, j].detach().cpu().numpy(), cmap="viridis", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("position embedding similarity", fontsize=10)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="cosine similarity")
    return fig


def patch_grid_figure(image, grid: tuple[int, int]) -> Figure:
    """The image cut into its (H', W') patches: what the model reads as words."""
    image = _hwc(image)
    H, W = grid
    fig = _figure(3.4, 3.6)
    ax = fig.subplots()
    ax.imshow(image)
    ph, pw = image.shape[0] / H, image.shape[1] / W
    for i in range(1, H):
        ax.axhline(i * ph - 0.5, color="white", linewidth=0.8)
    for j in range(1, W):
        ax.axvline(j * pw - 0.5, color="white", linewidth=0.8)
    ax.set_title(f"{H} x {W} patches", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    return fig


def pca_figure(image, rgb: torch.Tensor) -> Figure:
    """The image beside its (H', W', 3) feature-PCA colours."""
    image = _hwc(image)
    fig = _figure(6, 3.2)
    axes = fig.subplots(1, 2)
    _overlay(axes[0], image, None, "input")
    axes[1].imshow(rgb.detach().cpu().numpy(), interpolation="nearest")
    axes[1].set_title("patch features: PCA 1-3 as RGB", fontsize=9)
    axes[1].axis("off")
    fig.tight_layout()
    return fig


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def to_array(fig: Figure) -> np.ndarray:
    """uint8 (H, W, 3) pixels of the figure."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
