"""Non-maximum suppression in plain PyTorch (vitkit does not depend on torchvision)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS: indices (int64) of the boxes kept, highest score first.

    ``boxes`` (N, 4) xyxy, ``scores`` (N,). A box is dropped when its IoU with a kept box of
    higher score is above ``iou_threshold`` (torchvision's ``ops.nms`` rule; equal scores keep
    the earlier box).
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"nms needs boxes (N, 4) and scores (N,), got {tuple(boxes.shape)} and {tuple(scores.shape)}")
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    # Sequential by nature: each kept box is compared with the boxes after it only, in numpy,
    # whose small-array steps cost far less than an (N, N) IoU matrix or per-step tensor ops.
    x1, y1, x2, y2 = boxes[order].detach().float().cpu().numpy().T
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    removed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if removed[i]:
            continue
        keep.append(i)
        rest = slice(i + 1, None)
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        union = area[i] + area[rest] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, inter / union, 0.0)  # zero-area boxes overlap nothing
        removed[rest] |= iou > iou_threshold
    return order[torch.as_tensor(keep, dtype=torch.int64, device=order.device)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category ``idxs`` (N,): boxes of different categories never suppress each
    other. Indices (int64) of the boxes kept, highest score first."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    # Shifting each category's boxes by more than the extent of all boxes keeps them apart,
    # so one NMS pass does the per-category work.
    span = (boxes.max() - boxes.min()).float() + 1
    shifted = boxes.float() + (idxs.to(torch.float32) * span)[:, None]
    return nms(shifted, scores, iou_threshold)


__all__ = ["batched_nms", "nms"]
