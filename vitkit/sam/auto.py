"""Automatic mask generation: prompt SAM with a regular grid of points and keep the good masks.

segment-anything's ``SamAutomaticMaskGenerator`` on the whole image (one crop layer): each grid
point gives three masks; masks whose predicted IoU is at most ``pred_iou_thresh`` or whose
stability score (IoU of the mask thresholded at ``+offset`` and ``-offset`` around the mask
threshold) is below ``stability_score_thresh`` are dropped, then NMS on the masks' boxes (scored by
predicted IoU) removes duplicates. ``min_mask_region_area > 0`` then fills holes and removes
islands smaller than that many pixels (8-connected, as the reference's OpenCV step) and runs NMS
again.

>>> from vitkit.sam.auto import generate_masks
>>> records = generate_masks(model, "street.jpg", points_per_side=16)
>>> records[0]["segmentation"].shape, records[0]["predicted_iou"]
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .predictor import SamPredictor, image_array


def point_grid(n_per_side: int) -> np.ndarray:
    """(n^2, 2) points (x, y) evenly spaced in [0, 1]^2, half a step from the borders, row by row."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU between the masks at ``threshold + offset`` and ``threshold - offset`` (the first lies inside the
    second, so it is a ratio of areas). ``logits`` (..., H, W) -> (...)."""
    inner = (logits > mask_threshold + offset).sum((-1, -2), dtype=torch.int64)
    outer = (logits > mask_threshold - offset).sum((-1, -2), dtype=torch.int64)
    return inner / outer


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Inclusive pixel boxes (x0, y0, x1, y1) around bool masks (..., H, W) -> (..., 4) int64; [0, 0, 0, 0] for an
    empty mask."""
    H, W = masks.shape[-2:]
    rows, cols = masks.any(-1), masks.any(-2)  # (..., H), (..., W)
    ys = torch.arange(H, device=masks.device)
    xs = torch.arange(W, device=masks.device)
    y1 = torch.where(rows, ys, -1).amax(-1)
    y0 = torch.where(rows, ys, H).amin(-1)
    x1 = torch.where(cols, xs, -1).amax(-1)
    x0 = torch.where(cols, xs, W).amin(-1)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    return boxes * (rows.any(-1))[..., None]


def _run_min(lab: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Every run of mask pixels along the rows of ``m`` (H, W) takes the smallest label in the run."""
    starts = m.copy()
    starts[:, 1:] &= ~m[:, :-1]
    idx = np.flatnonzero(m)
    first = starts.ravel()[idx]  # run starts, in the order of idx
    mins = np.minimum.reduceat(lab.ravel()[idx], np.flatnonzero(first))
    out = lab.copy()
    out.ravel()[idx] = mins[np.cumsum(first) - 1]
    return out


def connected_components(mask, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a bool mask (H, W), 8- or 4-connected: (labels int64 (H, W), 0 = background and
    1..n in raster order of each component's first pixel; n)."""
    if connectivity not in (4, 8):
        raise ConfigError(f"connectivity is 4 or 8, got {connectivity}")
    m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask).astype(bool)
    H, W = m.shape
    if not m.any():
        return np.zeros((H, W), dtype=np.int64), 0
    big = H * W + 1
    diagonals = [(-1, -1), (-1, 1), (1, -1), (1, 1)] if connectivity == 8 else []
    # Labels start as raster index + 1 and only ever become the label of a connected pixel, so each is the
    # index of a pixel of the same component: whole row and column runs take their smallest label, diagonal
    # neighbours (8-connectivity) exchange theirs, and looking up the pixel a label names (pointer jumping)
    # shortcuts long chains, until nothing changes; each component then holds its smallest raster index.
    lab = np.where(m, np.arange(1, H * W + 1).reshape(H, W), big)
    while True:
        nxt = _run_min(lab, m)
        nxt = _run_min(nxt.T.copy(), m.T.copy()).T
        if diagonals:
            padded = np.pad(nxt, 1, constant_values=big)
            for dy, dx in diagonals:
                nxt = np.minimum(nxt, padded[1 + dy:1 + dy + H, 1 + dx:1 + dx + W])
        jumped = nxt.ravel()[np.minimum(nxt.ravel() - 1, H * W - 1)].reshape(H, W)
        nxt = np.where(m, np.minimum(nxt, jumped), big)
        if np.array_equal(nxt, lab):
            break
        lab = nxt
    roots, inverse = np.unique(lab[m], return_inverse=True)
    out = np.zeros((H, W), dtype=np.int64)
    out[m] = inverse.ravel() + 1
    return out, len(roots)


def remove_small_regions(mask: np.ndarray, min_area: int, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) smaller than ``min_area`` pixels (8-connected).
    Dropping islands keeps the largest one when all are small. Returns (mask, whether it changed)."""
    if mode not in ("holes", "islands"):
        raise ConfigError(f"mode is 'holes' or 'islands', got {mode!r}")
    mask = np.asarray(mask, dtype=bool)
    holes = mode == "holes"
    labels, n = connected_components(mask ^ holes)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = np.flatnonzero(sizes < min_area) + 1
    if len(small) == 0:
        return mask, False
    if holes:
        fill = np.concatenate([[0], small])
    else:
        fill = np.setdiff1d(np.arange(1, n + 1), small)
        if len(fill) == 0:
            fill = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(labels, fill), True


def _nms(boxes: torch.Tensor, scores: torch.Tensor, thresh: float) -> torch.Tensor:
    from ..detect.nms import nms

    return nms(boxes.float(), scores.float(), thresh)


def _check(points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh, box_nms_thresh,
           min_mask_region_area) -> None:
    if int(points_per_side) < 1:
        raise ConfigError(f"points_per_side must be at least 1, got {points_per_side}")
    if int(points_per_batch) < 1:
        raise ConfigError(f"points_per_batch must be at least 1, got {points_per_batch}")
    for name, v in (("pred_iou_thresh", pred_iou_thresh), ("stability_score_thresh", stability_score_thresh),
                    ("box_nms_thresh", box_nms_thresh)):
        if not 0 <= v <= 1:
            raise ConfigError(f"{name} must be in [0, 1], got {v}")
    if min_mask_region_area < 0:
        raise ConfigError(f"min_mask_region_area must be >= 0, got {min_mask_region_area}")


@torch.no_grad()
def generate_masks(model_or_predictor, image, points_per_side: int = 32, points_per_batch: int = 64,
                   pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                   stability_score_offset: float = 1.0, box_nms_thresh: float = 0.7,
                   min_mask_region_area: int = 0) -> list[dict]:
    """All the masks SAM finds in ``image`` (uint8 RGB (H, W, 3), PIL image or path), best first.

    ``model_or_predictor``: a :class:`vitkit.sam.Sam` or a :class:`SamPredictor` (its image is replaced).
    The defaults are segment-anything's (chosen there for ViT-H); a small or briefly trained model
    usually needs lower ``pred_iou_thresh`` and ``stability_score_thresh``.

    Returns one dict per mask: ``segmentation`` bool (H, W), ``area`` (pixels), ``bbox`` [x, y, w, h]
    (inclusive pixel box), ``predicted_iou``, ``stability_score``, ``point_coords`` [[x, y]] (the grid
    point that produced it, original pixels) and ``crop_box`` [0, 0, W, H].
    """
    _check(points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh, box_nms_thresh,
           min_mask_region_area)
    predictor = model_or_predictor if isinstance(model_or_predictor, SamPredictor) else SamPredictor(model_or_predictor)
    model = predictor.model
    arr = image_array(image)
    H, W = arr.shape[:2]
    predictor.set_image(arr)
    grid = point_grid(int(points_per_side)) * np.array([[W, H]], dtype=np.float64)
    kept_masks, kept_iou, kept_stab, kept_pts = [], [], [], []
    for start in range(0, len(grid), int(points_per_batch)):
        pts = grid[start:start + int(points_per_batch)]
        coords = model.transform_coords(torch.as_tensor(pts, dtype=torch.float64), predictor.original_size)
        coords = coords.to(predictor.device, torch.float32)[:, None, :]  # one point per prompt
        labels = torch.ones(len(pts), 1, dtype=torch.int64, device=predictor.device)
        logits, iou, _ = predictor.predict_torch((coords, labels), multimask=True)  # (P, M, H, W), (P, M)
        M = logits.shape[1]
        logits, iou = logits.flatten(0, 1), iou.flatten(0, 1).float()
        point_of = torch.as_tensor(pts).repeat_interleave(M, dim=0)
        keep = iou > pred_iou_thresh if pred_iou_thresh > 0 else torch.ones_like(iou, dtype=torch.bool)
        logits, iou, point_of = logits[keep], iou[keep], point_of[keep.cpu()]
        stab = stability_score(logits, model.mask_threshold, stability_score_offset)
        keep = stab >= stability_score_thresh if stability_score_thresh > 0 else torch.ones_like(stab, dtype=torch.bool)
        kept_masks.append((logits[keep] > model.mask_threshold).cpu())
        kept_iou.append(iou[keep].cpu())
        kept_stab.append(stab[keep].cpu())
        kept_pts.append(point_of[keep.cpu()])
    masks = torch.cat(kept_masks) if kept_masks else torch.zeros(0, H, W, dtype=torch.bool)
    iou, stab, pts = torch.cat(kept_iou), torch.cat(kept_stab), torch.cat(kept_pts)
    predictor.reset_image()
    boxes = mask_boxes(masks)
    order = _nms(boxes, iou, box_nms_thresh)
    masks, iou, stab, pts, boxes = masks[order], iou[order], stab[order], pts[order], boxes[order]
    if min_mask_region_area > 0 and len(masks):
        # The reference's threshold here is max(box_nms_thresh, crop_nms_thresh), whose default is 0.7.
        masks, boxes, order = _clean_small_regions(masks, int(min_mask_region_area), max(box_nms_thresh, 0.7))
        iou, stab, pts = iou[order], stab[order], pts[order]
    records = []
    for k in range(len(masks)):
        x0, y0, x1, y1 = boxes[k].tolist()
        records.append({
            "segmentation": masks[k].numpy(),
            "area": int(masks[k].sum()),
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "predicted_iou": float(iou[k]),
            "stability_score": float(stab[k]),
            "point_coords": [pts[k].tolist()],
            "crop_box": [0, 0, W, H],
        })
    return records


def _clean_small_regions(masks: torch.Tensor, min_area: int, nms_thresh: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fill small holes and drop small islands of each mask, then NMS again preferring the unchanged masks.
    Returns (masks, boxes, the indexes kept into the input)."""
    cleaned, unchanged = [], []
    for m in masks.numpy():
        m, changed_holes = remove_small_regions(m, min_area, "holes")
        m, changed_islands = remove_small_regions(m, min_area, "islands")
        cleaned.append(torch.from_numpy(m))
        unchanged.append(float(not (changed_holes or changed_islands)))
    new = torch.stack(cleaned)
    boxes = mask_boxes(new)
    keep = _nms(boxes, torch.tensor(unchanged), nms_thresh)
    # As the reference: the kept masks that changed take their cleaned form, the others stay as they were
    # (bitwise the same, since unchanged).
    return new[keep], boxes[keep], keep


__all__ = ["connected_components", "generate_masks", "mask_boxes", "point_grid", "remove_small_regions",
           "stability_score"]
