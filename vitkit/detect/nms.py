"""Non-maximum suppression in plain PyTorch (vitkit does not depend on torchvision)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _pairwise_iou(boxes: Tensor) -> Tensor:
    """(N, N) IoU of xyxy boxes with each other; zero-area boxes overlap nothing."""
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area[:, None] + area[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))


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
    over = (_pairwise_iou(boxes[order].float()) > iou_threshold).cpu().numpy()
    # The scan over kept boxes is sequential by nature; rows as numpy keep it cheap.
    removed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if removed[i]:
            continue
        keep.append(i)
        removed |= over[i]
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
