"""Hungarian matching of predicted boxes to ground-truth objects (DETR, Deformable DETR)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .boxes import box_cxcywh_to_xyxy, generalized_box_iou


def linear_sum_assignment(cost):
    """scipy's optimal assignment, imported when first needed (scipy is the detection extra)."""
    try:
        from scipy.optimize import linear_sum_assignment as lsa
    except ImportError:
        raise ConfigError("detection needs scipy for its matching: pip install 'vitkit[detect]'") from None
    return lsa(cost)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising DETR's matching cost.

    The cost of predicting target j with query i is ``cost_class * c_class + cost_bbox * L1 +
    cost_giou * (-GIoU)``, with L1 over the normalised cxcywh boxes and GIoU over their corners.
    ``c_class`` is DETR's ``-p(class_j)`` (softmax over C + 1 logits, the last "no object"), or with
    ``focal`` Deformable DETR's focal cost over sigmoid probabilities (C logits)
    ``alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p))``. Queries left unmatched
    are "no object". Deformable DETR's recipe uses ``cost_class=2``.

    ``forward(outputs, targets)``: ``outputs["pred_logits"]`` (B, Q, C + 1, or C with ``focal``),
    ``outputs["pred_boxes"]`` (B, Q, 4) cxcywh in [0, 1]; ``targets`` one dict per image with
    ``"labels"`` (K,) and ``"boxes"`` (K, 4) cxcywh in [0, 1]. Returns per image
    ``(query_idx, target_idx)`` int64 on the CPU, ``min(Q, K)`` pairs, query indices ascending.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal: bool = False, alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ConfigError("the matcher needs a non-zero cost: set cost_class, cost_bbox or cost_giou")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal, self.alpha, self.gamma = focal, alpha, gamma

    def class_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        """(Q, C') logits of one image and its (K,) labels -> (Q, K) classification cost."""
        if not self.focal:
            return -logits.softmax(-1)[:, labels]
        prob = logits.sigmoid()[:, labels]
        neg = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()
        pos = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        return pos - neg

    @torch.no_grad()
    def cost_matrices(self, outputs: dict, targets: list[dict]) -> list[Tensor]:
        """Each image's (Q, K) cost matrix."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(targets) != logits.shape[0]:
            raise ConfigError(f"the matcher got {len(targets)} targets for a batch of {logits.shape[0]} images")
        costs = []
        for b, t in enumerate(targets):
            labels, tgt = t["labels"].to(logits.device), t["boxes"].to(boxes)
            out = boxes[b].float()
            c = (
                self.cost_bbox * torch.cdist(out, tgt.float(), p=1)
                + self.cost_class * self.class_cost(logits[b].float(), labels)
                - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(out), box_cxcywh_to_xyxy(tgt.float()))
            )
            costs.append(c)
        return costs

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        costs = self.cost_matrices(outputs, targets)
        sizes = [c.shape[1] for c in costs]
        q = outputs["pred_logits"].shape[1]
        # One transfer for the whole batch; a diverged prediction (NaN, inf) is matched only when
        # nothing else can be, instead of failing inside scipy.
        flat = torch.cat([c.flatten() for c in costs]) if costs else torch.zeros(0)
        big = torch.finfo(flat.dtype).max
        flat = torch.nan_to_num(flat, nan=big, posinf=big, neginf=big).cpu()
        out, start = [], 0
        for k in sizes:
            c = flat[start:start + q * k].view(q, k)
            start += q * k
            i, j = linear_sum_assignment(c.numpy())
            out.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
        return out
