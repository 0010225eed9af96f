"""Masks from a promptable (SAM) model: for points and a box, or every mask it finds.

What ``vitkit segment`` runs:

>>> from vitkit.segment import segment
>>> result = segment("runs/my-sam-run", "street.jpg", points=[(120, 80)], out_dir="out")
>>> result["masks"][result["best"]]["file"]
'out/mask_1.png'
>>> segment("sam_vit_b_01ec64.pth", "street.jpg", auto=True, out_dir="auto")["overlay"]
'auto/overlay.png'
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import ConfigError, PathNotFoundError

# Prompt markers as the SAM demos draw them: green for foreground clicks, red for background ones.
POINT_COLOURS = {1: (0, 200, 60), 0: (230, 30, 30)}
BOX_COLOUR = (255, 200, 0)


def mask_colours(n: int) -> np.ndarray:
    """uint8 (n, 3) bright, well separated colours: hues a golden-ratio step apart, the first SAM's demo blue."""
    hues = (0.58 + 0.618034 * np.arange(n)) % 1.0
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 1.0)] for h in hues],
                    dtype=np.uint8).reshape(n, 3)


def draw_masks(image, masks: Sequence[np.ndarray] | np.ndarray, points=None, labels=None, box=None,
               alpha: float = 0.5) -> Image.Image:
    """``image`` (PIL or uint8 (H, W, 3)) with each bool mask (H, W) blended in its own colour (the largest
    first, so smaller masks stay visible on top), foreground points green, background points red, the box yellow."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float32)
    masks = [np.asarray(m, dtype=bool) for m in masks]
    for m in masks:
        if m.shape != rgb.shape[:2]:
            raise ValueError(f"mask {m.shape} and image {rgb.shape[:2]} differ in size")
    colours = mask_colours(len(masks)).astype(np.float32)
    out = rgb.copy()
    for k in sorted(range(len(masks)), key=lambda i: -int(masks[i].sum())):
        m = masks[k]
        out[m] = (1 - alpha) * out[m] + alpha * colours[k]
    img = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    width = max(1, round(max(img.size) / 200))
    if box is not None:
        draw.rectangle([float(v) for v in np.asarray(box, dtype=np.float64).reshape(4)], outline=BOX_COLOUR,
                       width=width)
    if points is not None and len(points):
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        labs = np.ones(len(pts), dtype=np.int64) if labels is None else np.asarray(labels).reshape(-1)
        r = max(3, round(max(img.size) / 80))
        for (x, y), lab in zip(pts.tolist(), labs.tolist()):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=POINT_COLOURS[int(lab)], outline=(255, 255, 255),
                         width=max(1, r // 3))
    return img


def _weight_keys(weights: Path) -> list[str]:
    if weights.is_file() and weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            return list(f.keys())
    from .weights_io import read_state_dict, unwrap

    return list(unwrap(read_state_dict(weights)[0]))


def is_sam_source(source) -> bool:
    """Whether ``source`` (a path) is a promptable-segmentation run or SAM weights in any layout vitkit reads:
    a mask decoder beside a prompt encoder (vitkit, segment-anything) or the shared image embedding
    (transformers)."""
    from .errors import VitkitError
    from .source import resolve_weights

    if not isinstance(source, (str, os.PathLike)) or not Path(source).expanduser().exists():
        return False
    try:
        weights, run = resolve_weights(source)
        if run is not None and run.is_run() and run.read_run_info().get("task") == "promptable":
            return True
        parts = [set(k.split(".")) for k in _weight_keys(weights)]
    except (VitkitError, OSError):
        return False
    return any("mask_decoder" in p for p in parts) and any({"prompt_encoder", "shared_image_embedding"} & p
                                                          for p in parts)


def load_sam_source(source: str | os.PathLike, device=None):
    """The SAM model of a run directory or weights file (vitkit's, segment-anything's or transformers'), in eval
    mode on ``device`` (default: the best available).

    Raises:
        PathNotFoundError: nothing at ``source``.
        ConfigError: ``source`` holds another kind of model (a classifier, a detector...).
    """
    from .engine.runtime import resolve_device
    from .sam import load_sam

    if not Path(source).expanduser().exists():
        raise PathNotFoundError(f"no such file or folder: {source}: pass a SAM run directory or SAM weights")
    if not is_sam_source(source):
        raise ConfigError(
            f"{source} is not a promptable-segmentation (SAM) model: pass a run trained with --task promptable "
            "(e.g. vitkit train --data scenes model.name=sam_nano), its model.safetensors, or segment-anything / "
            "transformers SAM weights"
        )
    model = load_sam(source)
    return model.to(resolve_device(device)).eval()


def segment(source, image, points=None, labels=None, box=None, *, auto: bool = False, multimask: bool = True,
            out_dir: str | os.PathLike | None = None, **auto_options) -> dict:
    """Segment ``image`` (a path, PIL image or uint8 array) with a SAM model and write the results.

    ``source``: a SAM run directory, weights file or a loaded :class:`vitkit.sam.Sam`. Prompt mode:
    ``points`` (N, 2) pixels (x, y) with ``labels`` (1 foreground, 0 background; default all 1) and/or
    ``box`` (x0, y0, x1, y1); ``multimask`` gives three candidate masks, else one. ``auto=True``: every
    mask found from a grid of points (``auto_options`` go to :func:`vitkit.sam.auto.generate_masks`).

    Writes into ``out_dir`` (default: ``<image name>_sam`` in the current folder) ``mask_K.png`` (0/255
    per mask), ``overlay.png`` (prompt mode: the best mask, the points and the box; auto: all masks) and
    ``masks.json``, which is also returned: ``{"image", "size": [W, H], "mode", "prompt", "best",
    "masks": [{"file", "predicted_iou", "area", "bbox" [x, y, w, h], ...}], "overlay"}``; the masks are
    in the model's order (prompt mode) or best first (auto).
    """
    from .sam.auto import generate_masks
    from .sam.predictor import SamPredictor, image_array

    if auto and (points is not None or box is not None):
        raise ConfigError("--auto finds every mask by itself: drop the points and the box, or drop --auto")
    if not auto and points is None and box is None:
        raise ConfigError("give a prompt (a point x,y or a box x0,y0,x1,y1), or auto=True (--auto) for every mask")
    if auto_options and not auto:
        raise ConfigError(f"{sorted(auto_options)} apply to automatic masks only (auto=True, --auto)")
    name = str(image) if isinstance(image, (str, os.PathLike)) else getattr(image, "filename", "") or None
    arr = image_array(image)
    model = source if hasattr(source, "encode_image") else load_sam_source(source)
    out = Path(out_dir) if out_dir is not None else Path.cwd() / f"{Path(name).stem if name else 'image'}_sam"
    predictor = SamPredictor(model)
    if auto:
        records = generate_masks(predictor, arr, **auto_options)
        masks = [r["segmentation"] for r in records]
        entries = [{k: v for k, v in r.items() if k != "segmentation"} for r in records]
        picture = draw_masks(arr, masks)
        prompt, best = None, 0 if records else None
    else:
        predictor.set_image(arr)
        pts = None if points is None else np.asarray(points, dtype=np.float64).reshape(-1, 2)
        labs = None if pts is None else np.asarray(np.ones(len(pts)) if labels is None else labels).reshape(-1)
        masks, iou, _ = predictor.predict(points=pts, labels=labs, box=box, multimask=multimask)
        best = int(np.argmax(iou))
        entries = []
        for m, score in zip(masks, iou.tolist()):
            ys, xs = np.nonzero(m)
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())] if len(xs) \
                else [0, 0, 0, 0]
            entries.append({"predicted_iou": float(score), "area": int(m.sum()), "bbox": bbox})
        picture = draw_masks(arr, [masks[best]], pts, labs, box)
        prompt = {"points": None if pts is None else pts.tolist(),
                  "labels": None if labs is None else labs.astype(int).tolist(),
                  "box": None if box is None else [float(v) for v in np.asarray(box).reshape(-1)],
                  "multimask": bool(multimask)}
    out.mkdir(parents=True, exist_ok=True)
    for k, (m, entry) in enumerate(zip(masks, entries)):
        path = out / f"mask_{k}.png"
        Image.fromarray(np.asarray(m, dtype=np.uint8) * 255).save(path)
        entry["file"] = str(path)
    overlay_path = out / "overlay.png"
    picture.save(overlay_path)
    result = {"image": name, "size": [int(arr.shape[1]), int(arr.shape[0])], "mode": "auto" if auto else "prompt",
              "prompt": prompt, "best": best, "masks": entries, "overlay": str(overlay_path)}
    (out / "masks.json").write_text(json.dumps(result, indent=2))
    return result


__all__ = ["draw_masks", "is_sam_source", "load_sam_source", "mask_colours", "segment"]
