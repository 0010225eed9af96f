"""Box utilities for detection: format conversion, IoU, generalised IoU and non-maximum suppression.

Boxes are ``xyxy`` (x0, y0, x1, y1) corners or ``cxcywh`` (centre, width, height), in the last
dimension. The DETR family predicts ``cxcywh`` normalised to [0, 1] by the image's true size;
data, evaluation and drawing use ``xyxy`` pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DataError
from .nms import batched_nms, nms  # noqa: F401  (box ops live together for users)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) centre-size boxes -> corners."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) corners -> centre-size boxes."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def _upcast(t: Tensor) -> Tensor:
    # Half-precision products of pixel coordinates overflow or lose the small areas.
    return t.float() if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64) else t


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy boxes -> (...,) areas."""
    boxes = _upcast(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes -> ``(iou, union)``, both (N, M)."""
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def _check_corners(boxes: Tensor, name: str) -> None:
    # A box with x1 < x0 gives a negative area and a meaningless (even > 1) GIoU: fail loudly.
    # NaN passes: a diverged prediction shows as a non-finite loss, which the trainer reports.
    inverted = (boxes[:, 2:] < boxes[:, :2]).any(-1)
    if boxes.numel() and inverted.any():
        bad = inverted.nonzero()[0].item()
        raise DataError(
            f"{name} must be xyxy boxes with x1 >= x0 and y1 >= y0; box {bad} is {boxes[bad].tolist()}: "
            "convert centre-size boxes with box_cxcywh_to_xyxy and drop degenerate ones"
        )


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalised IoU (Rezatofighi et al. 2019) of (N, 4) and (M, 4) xyxy boxes -> (N, M) in [-1, 1].

    IoU minus the share of the smallest enclosing box that the union does not cover.
    """
    _check_corners(boxes1, "boxes1")
    _check_corners(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


def _scale(size: Tensor, boxes: Tensor) -> Tensor:
    size = torch.as_tensor(size, device=boxes.device).to(boxes.dtype)
    h, w = size.unbind(-1)
    scale = torch.stack([w, h, w, h], dim=-1)
    # A (B, 2) size scales the boxes (B, N, 4) of each image.
    return scale.unsqueeze(-2) if boxes.ndim == scale.ndim + 1 else scale


def normalize_boxes(boxes: Tensor, size: Tensor) -> Tensor:
    """xyxy pixel boxes -> cxcywh normalised to [0, 1] by ``size`` (h, w), the image's true size.

    ``boxes`` (N, 4) with ``size`` (2,), or (B, N, 4) with ``size`` (B, 2).
    """
    return box_xyxy_to_cxcywh(_upcast(boxes)) / _scale(size, _upcast(boxes))


def denormalize_boxes(boxes: Tensor, size: Tensor) -> Tensor:
    """cxcywh boxes normalised by ``size`` (h, w) -> xyxy pixels; shapes as :func:`normalize_boxes`."""
    return box_cxcywh_to_xyxy(boxes) * _scale(size, boxes)
