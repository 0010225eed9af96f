"""From a set predictor's outputs to scored boxes in pixels (DETR's and Deformable DETR's PostProcess)."""

from __future__ import annotations

import torch
from torch import Tensor

from .boxes import denormalize_boxes


@torch.no_grad()
def set_postprocess(outputs: dict, sizes: Tensor, *, focal: bool = False, top_k: int = 100) -> list[dict]:
    """Per image ``"boxes"`` (N, 4) xyxy pixels, ``"scores"`` (N,), ``"labels"`` (N,) int64, best first.

    ``outputs["pred_logits"]`` (B, Q, C + 1) and ``outputs["pred_boxes"]`` (B, Q, 4) cxcywh in
    [0, 1]; ``sizes`` (B, 2) each image's true (h, w), to which the boxes are scaled.

    DETR (``focal=False``): softmax over the classes, "no object" (the last) dropped, each query
    its best class; the ``top_k`` best queries. Deformable DETR (``focal=True``, logits (B, Q, C)):
    sigmoid probabilities, the ``top_k`` best (query, class) pairs of all Q * C, so a query may
    appear with several classes.
    """
    logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
    b, q, c = logits.shape
    boxes = denormalize_boxes(boxes, sizes.to(boxes.device))
    if focal:
        k = min(top_k, q * c)
        scores, flat = logits.sigmoid().reshape(b, -1).topk(k, dim=1)
        query, labels = flat // c, flat % c
    else:
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        k = min(top_k, q)
        scores, query = scores.topk(k, dim=1)
        labels = labels.gather(1, query)
    boxes = boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
    return [{"boxes": boxes[i], "scores": scores[i], "labels": labels[i]} for i in range(b)]
