"""Pictures of dense predictions: class colours, index-mask PNGs, overlays, coloured depth.

Masks are saved as palette ("P" mode) PNGs whose pixel values are the class ids, the format
Pascal VOC uses: any image viewer shows the colours, and reading the file back gives the ids.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def class_colours(num_classes: int) -> np.ndarray:
    """uint8 (num_classes, 3): Pascal VOC's palette (class k's bits spread over R, G, B from the top bit down),
    so neighbouring ids get well separated colours and a VOC mask keeps its usual colours."""
    ids = np.arange(max(num_classes, 1))
    colours = np.zeros((len(ids), 3), dtype=np.int64)
    c = ids.copy()
    for shift in range(7, -1, -1):
        for ch in range(3):
            colours[:, ch] |= ((c >> ch) & 1) << shift
        c >>= 3
    return colours[:num_classes].astype(np.uint8)


def mask_image(mask: np.ndarray, num_classes: int) -> Image.Image:
    """Class ids (H, W) -> a palette PNG image: values are the ids, the palette gives their colours."""
    mask = np.asarray(mask)
    if mask.max(initial=0) > 255:
        raise ValueError(f"a palette PNG holds ids up to 255, got {int(mask.max())}")
    img = Image.fromarray(mask.astype(np.uint8))  # "L"; the palette makes it "P"
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:num_classes] = class_colours(num_classes)
    img.putpalette(palette.ravel().tolist())
    return img


def overlay(image: Image.Image | np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.5,
            ignore_index: int | None = None) -> Image.Image:
    """The image blended with each pixel's class colour (``alpha`` of the colour); ignored pixels keep the image."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    mask = np.asarray(mask, dtype=np.int64)
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"image {rgb.shape[:2]} and mask {mask.shape} differ in size")
    colours = class_colours(num_classes).astype(np.float32)
    valid = (mask >= 0) & (mask < num_classes)
    if ignore_index is not None:
        valid &= mask != ignore_index
    out = rgb.copy()
    out[valid] = (1 - alpha) * rgb[valid] + alpha * colours[mask[valid]]
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def legend(classes: list[str] | tuple[str, ...], present: np.ndarray | None = None) -> list[tuple[str, str]]:
    """``(name, "#rrggbb")`` per class (only the ``present`` ones when given), for a caption or a web page."""
    colours = class_colours(len(classes))
    keep = range(len(classes)) if present is None else [int(i) for i in present if 0 <= int(i) < len(classes)]
    return [(classes[i], "#{:02x}{:02x}{:02x}".format(*colours[i])) for i in keep]


def depth_png(depth: np.ndarray, path: str | os.PathLike) -> Path:
    """Save metres (H, W) as a 16-bit PNG in millimetres (0 = invalid), the depth-folder format vitkit reads."""
    mm = np.clip(np.nan_to_num(np.asarray(depth, dtype=np.float64)) * 1000.0, 0, 65535).round().astype(np.uint16)
    path = Path(path)
    Image.fromarray(mm).save(path)
    return path


def depth_colour(depth: np.ndarray, cmap: str = "turbo_r") -> Image.Image:
    """Metres (H, W) -> an RGB image, near = warm, far = cool, scaled to the 2nd-98th percentile of valid depth."""
    from matplotlib import colormaps

    d = np.asarray(depth, dtype=np.float64)
    valid = np.isfinite(d) & (d > 0)
    lo, hi = (np.percentile(d[valid], [2, 98]) if valid.any() else (0.0, 1.0))
    t = np.clip((d - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = colormaps[cmap](t)[..., :3]
    rgb[~valid] = 0
    return Image.fromarray((rgb * 255).round().astype(np.uint8))
