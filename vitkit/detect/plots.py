"""Pictures of detections: boxes with class names and scores drawn on the image, and DETR's
per-query decoder cross-attention over the image."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..dense.plots import class_colours


def box_colours(num_classes: int) -> np.ndarray:
    """uint8 (num_classes, 3): class k's box colour (the VOC palette without its black background entry)."""
    return class_colours(num_classes + 1)[1:]


def draw_detections(image: Image.Image, boxes, labels, scores, classes: Sequence[str], width: int | None = None
                    ) -> Image.Image:
    """A copy of ``image`` (RGB) with each box (xyxy pixels of the image) outlined in its class colour and
    labelled ``"<class> <score>"`` on a filled tag above its top-left corner (inside when at the top)."""
    img = image.convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    colours = box_colours(max(len(classes), 1))
    width = width or max(1, round(max(img.size) / 200))
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    # Lowest score first, so the best boxes and tags are drawn on top.
    for i in np.argsort(scores, kind="stable"):
        x0, y0, x1, y1 = boxes[i].tolist()
        k = int(labels[i])
        colour = tuple(int(c) for c in colours[k % len(colours)])
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        name = classes[k] if 0 <= k < len(classes) else str(k)
        text = f"{name} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text)
        tw, th = right - left, bottom - top
        ty = y0 - th - 4 if y0 - th - 4 >= 0 else y0
        draw.rectangle([x0, ty, x0 + tw + 4, ty + th + 4], fill=colour)
        dark = sum(colour) < 382  # light text on dark tags, dark on light
        draw.text((x0 + 2 - left, ty + 2 - top), text, fill=(255, 255, 255) if dark else (0, 0, 0))
    return img


def query_attention_figure(image: Image.Image, maps: np.ndarray, boxes, titles: Sequence[str],
                           path: str | os.PathLike, cols: int = 3) -> Path:
    """Save one panel per query: ``image`` with the query's cross-attention map ``maps[k]`` (h, w over the
    image's feature grid, upsampled to the image) as a heat map, its box (xyxy pixels) and ``titles[k]``."""
    from matplotlib.figure import Figure

    rgb = np.asarray(image.convert("RGB"))
    H, W = rgb.shape[:2]
    n = len(maps)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows * H / max(W, 1) + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for k in range(n):
        ax = axes[k]
        m = np.asarray(maps[k], dtype=np.float64)
        m = (m - m.min()) / max(m.max() - m.min(), 1e-12)
        heat = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize((W, H), Image.BILINEAR)) / 255.0
        ax.imshow(rgb)
        ax.imshow(heat, cmap="inferno", alpha=0.55, vmin=0, vmax=1)
        x0, y0, x1, y1 = np.asarray(boxes[k], dtype=np.float64).tolist()
        ax.add_patch(_rect(x0, y0, x1 - x0, y1 - y0))
        ax.set_title(titles[k], fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _rect(x, y, w, h):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, fill=False, edgecolor="cyan", linewidth=1.5)
