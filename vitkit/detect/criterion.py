"""DETR's set-prediction loss: Hungarian matching, then classification and box losses on the pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.distributed import all_reduce_sum, get_world_size
from ..errors import ConfigError, DataError
from .boxes import box_cxcywh_to_xyxy, generalized_box_iou, normalize_boxes


def normalize_targets(targets: list[dict]) -> list[dict]:
    """A detector's targets (``"boxes"`` xyxy pixels, ``"labels"``, ``"size"`` (h, w)) as the
    matcher and :class:`SetCriterion` take them: ``"labels"`` and ``"boxes"`` cxcywh in [0, 1]."""
    return [{"labels": t["labels"], "boxes": normalize_boxes(t["boxes"], t["size"])} for t in targets]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al. 2017) on (B, Q, C) logits against 0/1 ``targets``, as Deformable DETR sums it.

    The per-element loss ``alpha_t (1 - p_t)^gamma BCE`` is averaged over queries, summed over the
    batch and classes and divided by ``num_boxes`` (no alpha weighting when ``alpha < 0``).
    """
    return focal_terms(logits, targets, alpha, gamma).mean(1).sum() / num_boxes


def focal_terms(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """The per-element focal loss ``alpha_t (1 - p_t)^gamma BCE`` (no alpha weighting when ``alpha < 0``)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def _matched(indices: list[tuple[Tensor, Tensor]], device) -> tuple[Tensor, Tensor]:
    batch = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
    query = torch.cat([q for q, _ in indices])
    return batch.to(device), query.to(device)


class SetCriterion(nn.Module):
    """The DETR / Deformable DETR training loss over a batch.

    Queries are matched to the targets by ``matcher`` (a :class:`~vitkit.detect.matcher.HungarianMatcher`);
    matched queries learn their target's class and box, the others "no object":

    - ``loss_ce``: cross-entropy over C + 1 classes with the "no object" class weighted by
      ``eos_coef`` (DETR), or with ``focal`` the sigmoid focal loss over C classes times the number
      of queries divided by the number of boxes (Deformable DETR, ``focal_alpha``, gamma 2);
    - ``loss_bbox``: L1 of the normalised cxcywh boxes, and ``loss_giou``: 1 - GIoU, both summed
      over the matched pairs and divided by the number of target boxes, averaged over processes
      under DDP (at least 1).

    ``forward(outputs, targets)``: outputs as the matcher takes them, plus optionally
    ``"aux_outputs"`` (a list of such dicts, one per earlier decoder layer; used with ``aux``) and
    ``"enc_outputs"`` (Deformable DETR's two-stage proposals: every target becomes class 0, so
    only the first logit column is ever positive). Each gets the same losses, matched on its own,
    keys suffixed ``_{i}`` / ``_enc``. Returns the weighted parts (``weights`` by "ce", "bbox",
    "giou") and ``"loss"``, their sum. The defaults are DETR's (and YOLOS'); Deformable DETR's
    recipe is ``focal=True, weights={"ce": 2}`` with a ``HungarianMatcher(cost_class=2, focal=True)``.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, *, eos_coef: float = 0.1, focal: bool = False,
                 focal_alpha: float = 0.25, weights: dict | None = None, aux: bool = True):
        super().__init__()
        self.num_classes, self.matcher = num_classes, matcher
        self.eos_coef, self.focal, self.focal_alpha, self.aux = eos_coef, focal, focal_alpha, aux
        self.weights = {"ce": 1.0, "bbox": 5.0, "giou": 2.0, **(weights or {})}
        unknown = set(self.weights) - {"ce", "bbox", "giou"}
        if unknown:
            raise ConfigError(f"unknown loss weights {sorted(unknown)}: the parts are ce, bbox, giou")
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def loss_labels(self, outputs: dict, targets: list[dict], indices, num_boxes: float) -> Tensor:
        logits = outputs["pred_logits"]
        b, q, c = logits.shape
        expected = c if self.focal else c - 1
        if not self.focal and expected != self.num_classes:
            raise ConfigError(f"pred_logits has {c} classes; with {self.num_classes} classes and 'no object' "
                              f"it needs {self.num_classes + 1}")
        batch, query = _matched(indices, logits.device)
        target_classes = torch.full((b, q), expected, dtype=torch.int64, device=logits.device)
        target_classes[batch, query] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(
            logits.device)
        if not self.focal:
            return F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.dtype))
        # One-hot with an extra "no object" column, dropped: unmatched queries are all-zero targets.
        onehot = torch.zeros(b, q, c + 1, dtype=logits.dtype, device=logits.device)
        onehot.scatter_(2, target_classes.unsqueeze(-1), 1)
        return sigmoid_focal_loss(logits, onehot[..., :-1], num_boxes, alpha=self.focal_alpha, gamma=2.0) * q

    def loss_boxes(self, outputs: dict, targets: list[dict], indices, num_boxes: float) -> tuple[Tensor, Tensor]:
        boxes = outputs["pred_boxes"]
        batch, query = _matched(indices, boxes.device)
        src = boxes[batch, query]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
        l1 = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        return l1, (1 - giou).sum() / num_boxes

    def num_boxes(self, targets: list[dict], device) -> float:
        """Target boxes per process, averaged over the processes (DETR's normaliser), at least 1."""
        n = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        n = all_reduce_sum(n)
        return torch.clamp(n / get_world_size(), min=1).item()

    def _losses(self, outputs: dict, targets: list[dict], num_boxes: float, suffix: str) -> dict:
        indices = self.matcher(outputs, targets)
        ce = self.loss_labels(outputs, targets, indices, num_boxes)
        l1, giou = self.loss_boxes(outputs, targets, indices, num_boxes)
        w = self.weights
        return {f"loss_ce{suffix}": w["ce"] * ce, f"loss_bbox{suffix}": w["bbox"] * l1,
                f"loss_giou{suffix}": w["giou"] * giou}

    def check_labels(self, targets: list[dict]) -> None:
        labels = torch.cat([t["labels"].flatten() for t in targets]) if targets else torch.zeros(0)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = int(labels.min() if labels.min() < 0 else labels.max())
            raise DataError(f"a target has class {bad}, outside the {self.num_classes} classes "
                            f"0..{self.num_classes - 1}: the detector's num_classes and the data's classes disagree")

    def forward(self, outputs: dict, targets: list[dict]) -> dict:
        self.check_labels(targets)
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        losses = self._losses(outputs, targets, num_boxes, "")
        if self.aux:
            for i, aux in enumerate(outputs.get("aux_outputs") or []):
                losses.update(self._losses(aux, targets, num_boxes, f"_{i}"))
        if outputs.get("enc_outputs") is not None:
            # Two-stage proposals are class-agnostic: every target is foreground class 0.
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self._losses(outputs["enc_outputs"], binary, num_boxes, "_enc"))
        losses["loss"] = sum(losses.values())
        return losses
