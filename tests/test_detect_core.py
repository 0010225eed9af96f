"""Detection core: box ops, Hungarian matching, the set criterion, postprocessing and COCO evaluation.

Box ops are checked against torchvision and hand values, the matcher against brute force over
every assignment and HF transformers' matchers, the criterion against HF's DETR and Deformable
DETR losses, postprocessing against the references' algorithm written here, and the evaluator
against a hand-computed COCO AP and pycocotools called directly.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port, require_peer

from vitkit.detect.boxes import (
    batched_nms,
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    denormalize_boxes,
    generalized_box_iou,
    nms,
    normalize_boxes,
)
from vitkit.detect.criterion import SetCriterion, normalize_targets, sigmoid_focal_loss
from vitkit.detect.evaluate import CocoEvaluator
from vitkit.detect.matcher import HungarianMatcher
from vitkit.detect.postprocess import set_postprocess
from vitkit.errors import ConfigError, DataError

# ---- data ------------------------------------------------------------------------------------------


def rand_cxcywh(g: torch.Generator, n: int) -> torch.Tensor:
    """Random valid normalised boxes: centres in [0.2, 0.8], sizes in [0.05, 0.4]."""
    c = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.35 + 0.05
    return torch.cat([c, wh], -1)


def rand_xyxy(g: torch.Generator, n: int, scale: float = 100.0) -> torch.Tensor:
    return box_cxcywh_to_xyxy(rand_cxcywh(g, n)) * scale


def rand_outputs(g, b, q, c, *, focal=False, aux=0, enc=False):
    def one(classes):
        return {"pred_logits": torch.randn(b, q, classes, generator=g) * 2,
                "pred_boxes": rand_cxcywh(g, b * q).view(b, q, 4)}

    classes = c if focal else c + 1
    out = one(classes)
    if aux:
        out["aux_outputs"] = [one(classes) for _ in range(aux)]
    if enc:
        out["enc_outputs"] = one(c)
    return out


def rand_targets(g, counts, c):
    return [{"labels": torch.randint(0, c, (k,), generator=g), "boxes": rand_cxcywh(g, k)} for k in counts]


# ---- boxes -----------------------------------------------------------------------------------------


def test_box_formats_and_normalisation_by_hand():
    xyxy = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    cxcywh = torch.tensor([[20.0, 40.0, 20.0, 40.0]])
    assert torch.equal(box_xyxy_to_cxcywh(xyxy), cxcywh)
    assert torch.equal(box_cxcywh_to_xyxy(cxcywh), xyxy)
    assert box_area(xyxy).item() == 800.0
    # size is (h, w): x by the width 40, y by the height 80
    norm = normalize_boxes(xyxy, torch.tensor([80, 40]))
    assert torch.allclose(norm, torch.tensor([[0.5, 0.5, 0.5, 0.5]]))
    assert torch.allclose(denormalize_boxes(norm, torch.tensor([80, 40])), xyxy)
    # batched: (B, N, 4) with (B, 2)
    both = torch.stack([xyxy, xyxy * 2])
    sizes = torch.tensor([[80, 40], [160, 80]])
    assert torch.allclose(normalize_boxes(both, sizes), norm.expand(2, 1, 4))
    assert torch.allclose(denormalize_boxes(normalize_boxes(both, sizes), sizes), both)


def test_giou_by_hand_and_degenerate_boxes_fail_clearly():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [3.0, 0.0, 4.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    iou, union = box_iou(a, b)
    assert torch.allclose(iou, torch.tensor([[1 / 7, 0.0, 1.0]]))
    assert torch.allclose(union, torch.tensor([[7.0, 5.0, 4.0]]))
    # overlap: 1/7 - (9 - 7)/9; disjoint: 0 - (8 - 5)/8; identical: 1
    assert torch.allclose(generalized_box_iou(a, b), torch.tensor([[1 / 7 - 2 / 9, -3 / 8, 1.0]]))
    with pytest.raises(DataError, match="x1 >= x0"):
        generalized_box_iou(a, torch.tensor([[2.0, 0.0, 1.0, 1.0]]))


@pytest.mark.peer("transformers")
def test_box_ops_match_torchvision():
    ops = require_peer("torchvision.ops")
    g = torch.Generator().manual_seed(0)
    a, b = rand_xyxy(g, 7), rand_xyxy(g, 5)
    b[0] = a[0]
    assert torch.allclose(generalized_box_iou(a, b), ops.generalized_box_iou(a, b), atol=1e-6)
    assert torch.allclose(box_iou(a, b)[0], ops.box_iou(a, b), atol=1e-6)
    assert torch.allclose(box_area(a), ops.box_area(a))
    assert torch.allclose(box_xyxy_to_cxcywh(a), ops.box_convert(a, "xyxy", "cxcywh"), atol=1e-5)
    c = rand_cxcywh(g, 6)
    assert torch.allclose(box_cxcywh_to_xyxy(c), ops.box_convert(c, "cxcywh", "xyxy"), atol=1e-6)


def greedy_nms(boxes, scores, thr, groups=None):
    """The textbook loop: take the best remaining box, drop the rest of its group above ``thr``."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for i in order:
        if all(groups is not None and groups[i] != groups[j]
               or box_iou(boxes[i:i + 1], boxes[j:j + 1])[0].item() <= thr for j in keep):
            keep.append(i)
    return keep


def test_nms_matches_greedy_reference():
    g = torch.Generator().manual_seed(1)
    boxes = rand_xyxy(g, 40, scale=50.0)
    scores = torch.rand(40, generator=g)
    groups = torch.randint(0, 3, (40,), generator=g)
    for thr in (0.1, 0.5):
        assert nms(boxes, scores, thr).tolist() == greedy_nms(boxes, scores, thr)
        assert batched_nms(boxes, scores, groups, thr).tolist() == greedy_nms(boxes, scores, thr, groups.tolist())
    assert len(greedy_nms(boxes, scores, 0.1)) < len(greedy_nms(boxes, scores, 0.5, groups.tolist()))
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


# ---- matcher ---------------------------------------------------------------------------------------


def pair_cost(logits, box, label, tbox, focal, weights=(1.0, 5.0, 2.0)):
    """One query-target cost written from the papers, scalar by scalar."""
    if focal:
        p = torch.sigmoid(logits[label]).item()
        c_class = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)
    else:
        c_class = -torch.softmax(logits, -1)[label].item()
    l1 = (box - tbox).abs().sum().item()

    def corners(b):
        cx, cy, w, h = b.tolist()
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    ax0, ay0, ax1, ay1 = corners(box)
    bx0, by0, bx1, by1 = corners(tbox)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    giou = inter / union - (hull - union) / hull
    return weights[0] * c_class + weights[1] * l1 - weights[2] * giou


@pytest.mark.parametrize("focal", [False, True])
def test_matcher_finds_the_brute_force_optimum(focal):
    g = torch.Generator().manual_seed(2)
    q, c = 5, 3
    counts = [3, 0, 5, 1]
    outputs = rand_outputs(g, len(counts), q, c, focal=focal)
    targets = rand_targets(g, counts, c)
    indices = HungarianMatcher(focal=focal)(outputs, targets)
    for b, (t, (qi, ti)) in enumerate(zip(targets, indices)):
        k = len(t["labels"])
        assert qi.dtype == ti.dtype == torch.int64 and len(qi) == len(ti) == k
        cost = [[pair_cost(outputs["pred_logits"][b, i], outputs["pred_boxes"][b, i], t["labels"][j],
                           t["boxes"][j], focal) for j in range(k)] for i in range(q)]
        # every injective map of targets to queries
        best = min(itertools.permutations(range(q), k), key=lambda p: sum(cost[p[j]][j] for j in range(k)))
        got = dict(zip(ti.tolist(), qi.tolist()))
        assert [got[j] for j in range(k)] == list(best)
        assert qi.tolist() == sorted(qi.tolist())


def hf_matcher_and_loss(focal: bool):
    """HF transformers' DETR (or, focal, Deformable DETR) matcher class and loss function."""
    hf = require_peer(f"transformers.loss.{'loss_deformable_detr' if focal else 'loss_for_object_detection'}")
    if focal:
        return hf.DeformableDetrHungarianMatcher, hf.DeformableDetrForObjectDetectionLoss
    return hf.HungarianMatcher, hf.ForObjectDetectionLoss


@pytest.mark.peer("transformers")
@pytest.mark.parametrize("focal", [False, True])
def test_matcher_matches_hf(focal):
    cls, _ = hf_matcher_and_loss(focal)
    g = torch.Generator().manual_seed(3)
    outputs = rand_outputs(g, 3, 20, 4, focal=focal)
    targets = rand_targets(g, [6, 0, 11], 4)
    ours = HungarianMatcher(2.0, 5.0, 2.0, focal=focal)(outputs, targets)
    theirs = cls(class_cost=2.0, bbox_cost=5.0, giou_cost=2.0)(
        {"logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]},
        [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets])
    for (a, b), (x, y) in zip(ours, theirs):
        assert torch.equal(a, x) and torch.equal(b, y)


def test_matcher_rejects_bad_settings():
    with pytest.raises(ConfigError, match="non-zero cost"):
        HungarianMatcher(0, 0, 0)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match="2 targets for a batch of 3"):
        HungarianMatcher()(rand_outputs(g, 3, 4, 2), rand_targets(g, [1, 1], 2))


# ---- criterion -------------------------------------------------------------------------------------


def hf_targets(targets):
    return [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]


def hf_config(aux_layers, focal):
    return SimpleNamespace(class_cost=2.0 if focal else 1.0, bbox_cost=5.0, giou_cost=2.0, num_labels=4,
                           eos_coefficient=0.1, focal_alpha=0.25, auxiliary_loss=aux_layers > 0,
                           bbox_loss_coefficient=5.0, giou_loss_coefficient=2.0, decoder_layers=aux_layers + 1)


@pytest.mark.peer("transformers")
@pytest.mark.parametrize("focal", [False, True])
def test_criterion_matches_hf_loss_with_aux_outputs(focal):
    _, loss_fn = hf_matcher_and_loss(focal)
    g = torch.Generator().manual_seed(4)
    c, aux = 4, 2
    outputs = rand_outputs(g, 3, 12, c, focal=focal, aux=aux)
    targets = rand_targets(g, [3, 0, 7], c)
    crit = SetCriterion(c, HungarianMatcher(2.0 if focal else 1.0, 5.0, 2.0, focal=focal), focal=focal)
    ours = crit(outputs, targets)

    layers = [*outputs["aux_outputs"], outputs]
    total, parts, _ = loss_fn(
        outputs["pred_logits"], hf_targets(targets), "cpu", outputs["pred_boxes"], hf_config(aux, focal),
        outputs_class=torch.stack([o["pred_logits"] for o in layers]),
        outputs_coord=torch.stack([o["pred_boxes"] for o in layers]))
    assert abs(ours["loss"].item() - total.item()) < 1e-5
    weight = {"ce": 1.0, "bbox": 5.0, "giou": 2.0}
    for suffix in ["", *(f"_{i}" for i in range(aux))]:
        for part, w in weight.items():
            key = f"loss_{part}{suffix}"
            assert abs(ours[key].item() - w * parts[key].item()) < 1e-5, key
    assert set(ours) == {f"loss_{p}{s}" for p in weight for s in ["", "_0", "_1"]} | {"loss"}


@pytest.mark.peer("transformers")
def test_two_stage_encoder_loss_is_binary_and_matches_hf():
    hf = require_peer("transformers.loss.loss_deformable_detr")
    g = torch.Generator().manual_seed(5)
    c = 3
    outputs = rand_outputs(g, 2, 10, c, focal=True, enc=True)
    outputs["enc_outputs"]["pred_logits"] = outputs["enc_outputs"]["pred_logits"][..., :1]  # one foreground logit
    targets = rand_targets(g, [4, 2], c)
    crit = SetCriterion(c, HungarianMatcher(2.0, 5.0, 2.0, focal=True), focal=True, weights={"ce": 2.0})
    ours = crit(outputs, targets)
    binary = [{"class_labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
    hf_crit = hf.DeformableDetrImageLoss(hf.DeformableDetrHungarianMatcher(2.0, 5.0, 2.0), 1, 0.25,
                                         ["labels", "boxes"])
    enc = outputs["enc_outputs"]
    theirs = hf_crit({"logits": enc["pred_logits"], "pred_boxes": enc["pred_boxes"]}, binary)
    assert abs(ours["loss_ce_enc"].item() - 2.0 * theirs["loss_ce"].item()) < 1e-5
    assert abs(ours["loss_bbox_enc"].item() - 5.0 * theirs["loss_bbox"].item()) < 1e-5
    assert abs(ours["loss_giou_enc"].item() - 2.0 * theirs["loss_giou"].item()) < 1e-5
    parts = [v for k, v in ours.items() if k != "loss"]
    assert len(parts) == 6 and torch.allclose(ours["loss"], sum(parts))


def test_criterion_on_images_without_boxes():
    g = torch.Generator().manual_seed(6)
    c, q = 3, 6
    targets = rand_targets(g, [0, 0], c)
    out = rand_outputs(g, 2, q, c)
    out["pred_logits"].requires_grad_(True)
    losses = SetCriterion(c, HungarianMatcher())(out, targets)
    # every query is "no object"; the class weights cancel in the weighted mean
    expected = -out["pred_logits"].log_softmax(-1)[..., -1].mean()
    assert torch.allclose(losses["loss_ce"], expected)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    losses["loss"].backward()
    assert torch.isfinite(out["pred_logits"].grad).all() and out["pred_logits"].grad.abs().sum() > 0

    out = rand_outputs(g, 2, q, c, focal=True)
    losses = SetCriterion(c, HungarianMatcher(focal=True), focal=True)(out, targets)
    p = out["pred_logits"].sigmoid()
    # all-negative focal loss, mean over queries, summed, times Q, over max(0 boxes, 1)
    focal = (0.75 * p**2 * -torch.log(1 - p)).mean(1).sum() * q
    assert torch.allclose(losses["loss_ce"], focal, atol=1e-6)
    assert losses["loss_bbox"].item() == 0


def test_focal_loss_by_hand_and_criterion_checks_class_count():
    logits = torch.tensor([[[2.0, -1.0]]])
    targets = torch.tensor([[[1.0, 0.0]]])
    p1, p2 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))
    expected = 0.25 * (1 - p1) ** 2 * -math.log(p1) + 0.75 * p2**2 * -math.log(1 - p2)
    assert abs(sigmoid_focal_loss(logits, targets, 2.0).item() - expected / 2) < 1e-6
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match="needs 4"):
        SetCriterion(3, HungarianMatcher())(rand_outputs(g, 1, 4, 4), rand_targets(g, [1], 3))
    with pytest.raises(ConfigError, match="unknown loss weights"):
        SetCriterion(3, HungarianMatcher(), weights={"cls": 1.0})


def test_criterion_input_checks_and_pixel_targets():
    g = torch.Generator().manual_seed(10)
    crit = SetCriterion(3, HungarianMatcher())
    with pytest.raises(DataError, match="class 3, outside the 3 classes"):
        crit(rand_outputs(g, 1, 4, 3), [{"labels": torch.tensor([3]), "boxes": rand_cxcywh(g, 1)}])
    # a detector's pixel targets: x by the width 200, y by the height 100
    pix = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "size": torch.tensor([100, 200])}]
    (t,) = normalize_targets(pix)
    assert torch.allclose(t["boxes"], torch.tensor([[0.2, 0.3, 0.2, 0.4]])) and torch.equal(t["labels"], pix[0]["labels"])
    # a diverged prediction gives a non-finite loss (the trainer's to report), not a box error
    out = rand_outputs(g, 1, 4, 3)
    out["pred_boxes"][:] = float("nan")
    assert not torch.isfinite(crit(out, [t])["loss"])


def test_missing_detection_extra_is_a_config_error(monkeypatch):
    g = torch.Generator().manual_seed(0)
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(ConfigError, match=r"pip install 'vitkit\[detect\]'"):
        HungarianMatcher()(rand_outputs(g, 1, 3, 2), rand_targets(g, [1], 2))
    monkeypatch.setitem(sys.modules, "pycocotools.cocoeval", None)
    ev = CocoEvaluator(["a"])
    ev.update(batch_of([HALF], [[0, 0]], [[200, 200]], [[400, 400]]), {"detections": [dets_of(HALF, [1, 1], [0, 0])]})
    with pytest.raises(ConfigError, match=r"pip install 'vitkit\[detect\]'"):
        ev.compute()


# ---- postprocess -----------------------------------------------------------------------------------


def test_postprocess_detr_drops_no_object_and_scales_to_pixels():
    g = torch.Generator().manual_seed(7)
    out = rand_outputs(g, 2, 8, 3)
    sizes = torch.tensor([[60, 100], [30, 40]])
    res = set_postprocess(out, sizes, top_k=5)
    for b, r in enumerate(res):
        h, w = sizes[b].tolist()
        rows = []
        for i in range(8):
            prob = torch.softmax(out["pred_logits"][b, i], -1)[:3]
            cx, cy, bw, bh = out["pred_boxes"][b, i].tolist()
            box = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
            rows.append((prob.max().item(), prob.argmax().item(), box))
        rows.sort(key=lambda x: -x[0])
        assert torch.allclose(r["scores"], torch.tensor([x[0] for x in rows[:5]]))
        assert r["labels"].tolist() == [x[1] for x in rows[:5]] and r["labels"].dtype == torch.int64
        assert torch.allclose(r["boxes"], torch.tensor([x[2] for x in rows[:5]]), atol=1e-4)


def test_postprocess_focal_takes_top_k_over_queries_and_classes():
    g = torch.Generator().manual_seed(8)
    q, c = 6, 4
    out = rand_outputs(g, 2, q, c, focal=True)
    sizes = torch.tensor([[50, 70], [20, 20]])
    res = set_postprocess(out, sizes, focal=True, top_k=10)
    for b, r in enumerate(res):
        h, w = sizes[b].tolist()
        pairs = sorted(((torch.sigmoid(out["pred_logits"][b, i, k]).item(), i, k)
                        for i in range(q) for k in range(c)), reverse=True)[:10]
        assert torch.allclose(r["scores"], torch.tensor([s for s, _, _ in pairs]))
        assert r["labels"].tolist() == [k for _, _, k in pairs]
        boxes = box_cxcywh_to_xyxy(out["pred_boxes"][b, [i for _, i, _ in pairs]]) * torch.tensor([w, h, w, h])
        assert torch.allclose(r["boxes"], boxes, atol=1e-4)
    assert len(set_postprocess(out, sizes, focal=True, top_k=1000)[0]["scores"]) == q * c


@pytest.mark.peer("transformers")
@pytest.mark.parametrize("focal", [False, True])
def test_postprocess_matches_hf_image_processors(focal):
    tr = require_peer("transformers")
    proc = tr.DeformableDetrImageProcessor() if focal else tr.DetrImageProcessor()
    g = torch.Generator().manual_seed(11)
    out = rand_outputs(g, 2, 30, 5, focal=focal)
    sizes = torch.tensor([[50, 70], [20, 30]])
    theirs = proc.post_process_object_detection(
        SimpleNamespace(logits=out["pred_logits"], pred_boxes=out["pred_boxes"]), threshold=0.0,
        target_sizes=sizes, **({"top_k": 40} if focal else {}))
    ours = set_postprocess(out, sizes, focal=focal, top_k=40 if focal else 100)
    for a, b in zip(ours, theirs):
        order = b["scores"].argsort(descending=True, stable=True)  # DETR's keeps query order
        assert torch.allclose(a["scores"], b["scores"][order], atol=1e-6)
        assert torch.equal(a["labels"], b["labels"][order])
        assert torch.allclose(a["boxes"], b["boxes"][order], atol=1e-4)


# ---- COCO evaluator --------------------------------------------------------------------------------


def batch_of(gt_boxes, gt_labels, size, orig_size, image_ids=None):
    b = {"boxes": [torch.tensor(x, dtype=torch.float32).view(-1, 4) for x in gt_boxes],
         "labels": [torch.tensor(x, dtype=torch.int64) for x in gt_labels],
         "size": torch.tensor(size), "orig_size": torch.tensor(orig_size)}
    if image_ids is not None:
        b["image_id"] = image_ids
    return b


def dets_of(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64)}


# One 400x400 image, two large objects; its batch copy is half size, so everything scales by 2.
GT = [[0, 0, 100, 100], [100, 100, 300, 300]]
HALF = [[x / 2 for x in box] for box in GT]


def test_coco_ap_equals_the_hand_computed_101_point_value():
    ev = CocoEvaluator(["thing"])
    # a perfect hit (0.9), a false positive (0.8), a hit on the second object with IoU
    # 200*144 / 200*200 = 0.72 (0.7): a match at IoU thresholds 0.50..0.70, a miss from 0.75
    preds = [[0, 0, 50, 50], [300 / 2, 0, 390 / 2, 80 / 2], [50, 50, 150, 122]]
    ev.update(batch_of([HALF], [[0, 0]], [[200, 200]], [[400, 400]]),
              {"detections": [dets_of(preds, [0.9, 0.8, 0.7], [0, 0, 0])]})
    m = ev.compute()
    # thresholds 0.50..0.70: recall 0.5 at precision 1, then recall 1 at precision 2/3 ->
    # 51 of the 101 recall points at 1, 50 at 2/3; 0.75..0.95: only recall 0.5 -> 51 points at 1
    ap_low, ap_high = (51 + 50 * 2 / 3) / 101, 51 / 101
    assert m["ap50"] == pytest.approx(ap_low, abs=1e-9)
    assert m["ap75"] == pytest.approx(ap_high, abs=1e-9)
    assert m["ap"] == pytest.approx((5 * ap_low + 5 * ap_high) / 10, abs=1e-9)
    # both objects are large (above 96x96 in the original); the false positive (90x80) is medium, and
    # COCO ignores an unmatched detection outside the area range: precision 1 wherever recall is reached
    assert m["ap_large"] == pytest.approx((5 * 1.0 + 5 * ap_high) / 10, abs=1e-9)
    assert m["ap_small"] == -1 and m["ap_medium"] == -1  # no ground truth of those sizes
    assert m["ar100"] == pytest.approx((5 * 1.0 + 5 * 0.5) / 10, abs=1e-9)
    assert ev.per_class_ap == [pytest.approx(m["ap"], abs=1e-9)]
    assert ev.primary == "ap" and ev.higher_is_better


def test_coco_perfect_none_and_empty():
    ev = CocoEvaluator(["a", "b"])
    batch = batch_of([HALF, []], [[0, 1], []], [[200, 200], [100, 150]], [[400, 400], [200, 300]])
    ev.update(batch, {"detections": [dets_of(HALF, [0.9, 0.8], [0, 1]), dets_of([], [], [])]})
    m = ev.compute()
    assert m["ap"] == pytest.approx(1.0) and m["ap50"] == pytest.approx(1.0) and m["ar100"] == pytest.approx(1.0)
    assert ev.per_class_ap == [pytest.approx(1.0), pytest.approx(1.0)]

    ev.reset()  # no detections at all: 0, not a crash
    ev.update(batch, {"detections": [dets_of([], [], []), dets_of([], [], [])]})
    m = ev.compute()
    assert m["ap"] == 0 and m["ap50"] == 0 and m["ar100"] == 0

    ev.reset()  # a class without ground truth has no AP; a detection of it costs nothing elsewhere
    ev.update(batch_of([HALF], [[0, 0]], [[200, 200]], [[400, 400]]),
              {"detections": [dets_of(HALF + [[0, 0, 10, 10]], [0.9, 0.8, 0.95], [0, 0, 1])]})
    assert ev.compute()["ap"] == pytest.approx(1.0) and ev.per_class_ap == [pytest.approx(1.0), None]

    ev.reset()
    assert ev.compute() == {}
    with pytest.raises(DataError, match="outside the 2 classes"):
        ev.update(batch, {"detections": [dets_of(HALF, [0.9, 0.8], [0, 2]), dets_of([], [], [])]})
        ev.compute()


def test_coco_counts_a_repeated_image_once_and_unknown_ids_always():
    hit = {"detections": [dets_of(HALF, [0.9, 0.8], [0, 0])]}
    miss = {"detections": [dets_of([], [], [])]}
    ev = CocoEvaluator(["thing"])
    for ids, outputs in [([-1], hit), ([-1], miss)]:  # unknown ids: two images, one missed
        ev.update(batch_of([HALF], [[0, 0]], [[200, 200]], [[400, 400]], ids), outputs)
    assert ev.compute()["ar100"] == pytest.approx(0.5)
    ev.reset()
    for ids, outputs in [([7], hit), ([7], miss)]:  # the same image twice: its first showing counts
        ev.update(batch_of([HALF], [[0, 0]], [[200, 200]], [[400, 400]], ids), outputs)
    assert ev.compute()["ar100"] == pytest.approx(1.0)
    ev.reset()
    for outputs in (hit, miss):  # no image ids: the dataset index identifies the image
        batch = batch_of([HALF], [[0, 0]], [[200, 200]], [[400, 400]])
        ev.update({**batch, "index": torch.tensor([3])}, outputs)
    assert ev.compute()["ar100"] == pytest.approx(1.0)


def test_coco_evaluator_equals_pycocotools_on_the_same_json(tmp_path):
    coco_mod = require_peer("pycocotools.coco")
    cocoeval_mod = require_peer("pycocotools.cocoeval")
    g = torch.Generator().manual_seed(9)
    classes = ["a", "b", "c"]
    ev = CocoEvaluator(classes)
    for step in range(3):  # three batches of two images, some without ground truth
        n_gt = [int(torch.randint(1 if step == 0 else 0, 5, (1,), generator=g)) for _ in range(2)]
        gts = [rand_xyxy(g, k, 120.0) for k in n_gt]
        labels = [torch.randint(0, 3, (k,), generator=g) for k in n_gt]
        dets = []
        for k, boxes, lab in zip(n_gt, gts, labels):
            noisy = boxes + torch.randn(boxes.shape, generator=g) * 4
            extra = rand_xyxy(g, 3, 120.0)
            dets.append({"boxes": torch.cat([noisy, extra]).clamp(min=0), "scores": torch.rand(k + 3, generator=g),
                         "labels": torch.cat([lab, torch.randint(0, 3, (3,), generator=g)])})
        batch = {"boxes": gts, "labels": labels, "size": torch.tensor([[120, 120], [120, 96]]),
                 "orig_size": torch.tensor([[240, 360], [60, 48]]), "image_id": [2 * step, 2 * step + 1]}
        ev.update(batch, {"detections": dets})
        if step == 0:
            first = gts[0]
    m = ev.compute()

    gt_json, det_json = ev.coco_json(ev.records)
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    (tmp_path / "dt.json").write_text(json.dumps(det_json))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_mod.COCO(str(tmp_path / "gt.json"))
        ref = cocoeval_mod.COCOeval(gt, gt.loadRes(str(tmp_path / "dt.json")), "bbox")
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
    for key, i in [("ap", 0), ("ap50", 1), ("ap75", 2), ("ap_small", 3), ("ap_medium", 4), ("ap_large", 5),
                   ("ar100", 8)]:
        assert m[key] == pytest.approx(ref.stats[i], abs=1e-12), key
    assert 0 < m["ap"] < 1
    # the json is in original pixels: an image's width and one box rescaled by (360/120, 240/120)
    assert gt_json["images"][0] == {"id": 1, "height": 240, "width": 360}
    x0, y0, x1, y1 = first[0].tolist()
    ann = gt_json["annotations"][0]
    assert ann["image_id"] == 1
    assert ann["bbox"] == pytest.approx([3 * x0, 2 * y0, 3 * (x1 - x0), 2 * (y1 - y0)], rel=1e-6)
    assert ann["area"] == pytest.approx(6 * (x1 - x0) * (y1 - y0), rel=1e-6)
    prec = ref.eval["precision"][:, :, :, 0, -1]
    for k in range(3):
        p = prec[:, :, k]
        assert ev.per_class_ap[k] == pytest.approx(float(np.mean(p[p > -1])))


# ---- DDP: num_boxes averaged over processes, detections gathered -----------------------------------


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        crit = SetCriterion(2, HungarianMatcher())
        n = crit.num_boxes(rand_targets(g, [3, 2] if rank == 0 else [1, 0], 2), "cpu")
        ev = CocoEvaluator(["thing"])
        # rank 0 sees the perfect image, rank 1 a miss on another image and a repeat of image 0
        if rank == 0:
            ev.update(batch_of([HALF], [[0, 0]], [[200, 200]], [[400, 400]], [0]),
                      {"detections": [dets_of(HALF, [0.9, 0.8], [0, 0])]})
        else:
            ev.update(batch_of([GT, HALF], [[0, 0], [0, 0]], [[400, 400], [200, 200]], [[400, 400], [400, 400]],
                               [1, 0]),
                      {"detections": [dets_of([], [], []), dets_of([], [], [])]})
        m = ev.compute()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"num_boxes": n, "ap": m["ap"], "n_images": len(ev._gathered())}, f)
    finally:
        dist.destroy_process_group()


def test_ddp_averages_num_boxes_and_gathers_detections(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # (5 + 1) boxes / 2 processes; two distinct images, one of four objects found -> recall 0.5
    assert [r["num_boxes"] for r in got] == [3.0, 3.0]
    assert got[0]["n_images"] == got[1]["n_images"] == 2
    single = CocoEvaluator(["thing"])
    single.update(batch_of([HALF, GT], [[0, 0], [0, 0]], [[200, 200], [400, 400]], [[400, 400]] * 2),
                  {"detections": [dets_of(HALF, [0.9, 0.8], [0, 0]), dets_of([], [], [])]})
    ap = single.compute()["ap"]
    assert 0 < ap < 1 and got[0]["ap"] == got[1]["ap"] == pytest.approx(ap)
