"""The ViTDet detector (simple pyramid + FCOS head) and the pure-torch NMS: FCOS's target
assignment against a reference written from the paper's rules, the losses against hand
computations, NMS against brute force, and a tiny detector that overfits two images."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from vitkit.detect import create_detector, detector_entry, vitdet_det
from vitkit.detect.nms import batched_nms, nms
from vitkit.detect.vitdet_det import (
    centerness_target,
    default_size_ranges,
    fcos_targets,
    focal_loss_sum,
    giou_loss_ltrb,
    level_locations,
)
from vitkit.errors import ConfigError, DataError

TINY = dict(channels=32, num_convs=2)


@pytest.fixture(autouse=True)
def one_thread():
    # These models are tiny: one thread is as fast, and two threads on a busy machine can be
    # tens of times slower (each waits on the other).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(num_classes: int = 2, backbone: str = "test_vitdet", **kw):
    torch.manual_seed(0)
    return create_detector("vitdet_fcos", backbone, num_classes=num_classes, **{**TINY, **kw})


# ---------------------------------------------------------------------- references written here
def ref_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_nms(boxes: list, scores: list, thr: float) -> list[int]:
    """Greedy NMS as the papers state it: take the best remaining box, drop those above thr."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep = []
    for i in order:
        if all(ref_iou(boxes[i], boxes[j]) <= thr for j in keep):
            keep.append(i)
    return keep


def ref_fcos_assign(img_hw, strides, ranges, boxes, labels, num_classes, radius):
    """FCOS (Tian et al.): every feature position (i, j) at stride s maps to the pixel
    (s // 2 + j s, s // 2 + i s); it is positive for a box when it lies inside the box (center
    sampling: inside the box clipped to radius * s around the box centre) and max(l, t, r, b) is
    in the level's range; several boxes -> the one of minimal area."""
    out_cls, out_reg = [], []
    H, W = img_hw
    for s, (lo, hi) in zip(strides, ranges):
        for i in range(math.ceil(H / s)):
            for j in range(math.ceil(W / s)):
                x, y = s // 2 + j * s, s // 2 + i * s
                best, best_area = None, math.inf
                for k, (x1, y1, x2, y2) in enumerate(boxes):
                    l, t, r, b = x - x1, y - y1, x2 - x, y2 - y
                    if radius > 0:
                        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                        rx1, ry1 = max(cx - radius * s, x1), max(cy - radius * s, y1)
                        rx2, ry2 = min(cx + radius * s, x2), min(cy + radius * s, y2)
                        inside = min(x - rx1, y - ry1, rx2 - x, ry2 - y) > 0
                    else:
                        inside = min(l, t, r, b) > 0
                    m = max(l, t, r, b)
                    area = (x2 - x1) * (y2 - y1)
                    if inside and lo <= m <= hi and area < best_area:
                        best, best_area = k, area
                if best is None:
                    out_cls.append(num_classes)
                    out_reg.append(None)
                else:
                    x1, y1, x2, y2 = boxes[best]
                    out_cls.append(labels[best])
                    out_reg.append((x - x1, y - y1, x2 - x, y2 - y))
    return out_cls, out_reg


def synthetic(n_img: int = 2, size: int = 64):
    """Images of solid rectangles on black, one colour per class, and their boxes."""
    specs = [[(4, 6, 30, 40, 0), (36, 20, 60, 58, 1)], [(10, 30, 50, 60, 1), (40, 4, 60, 24, 0)]][:n_img]
    colours = torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, -0.5]])
    images = torch.zeros(len(specs), 3, size, size)
    targets = []
    for i, spec in enumerate(specs):
        for x1, y1, x2, y2, c in spec:
            images[i, :, y1:y2, x1:x2] = colours[c][:, None, None]
        targets.append({"boxes": torch.tensor([s[:4] for s in spec], dtype=torch.float32),
                        "labels": torch.tensor([s[4] for s in spec]),
                        "size": torch.tensor([size, size])})
    return images, targets


# ---------------------------------------------------------------------- NMS
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_matches_brute_force(thr):
    g = torch.Generator().manual_seed(int(thr * 10))
    xy = torch.rand(60, 2, generator=g) * 50
    wh = torch.rand(60, 2, generator=g) * 30 + 1
    boxes = torch.cat((xy, xy + wh), 1)
    boxes[5] = boxes[4]  # an exact duplicate
    scores = torch.rand(60, generator=g)
    scores[10] = scores[11]  # a tie: the earlier box wins
    keep = nms(boxes, scores, thr)
    assert keep.dtype == torch.int64
    assert keep.tolist() == ref_nms(boxes.tolist(), scores.tolist(), thr)
    assert 4 not in keep.tolist() or 5 not in keep.tolist()

    labels = torch.randint(0, 3, (60,), generator=g)
    got = batched_nms(boxes, scores, labels, thr)
    want = []
    for c in range(3):
        idx = (labels == c).nonzero().squeeze(1).tolist()
        want += [idx[i] for i in ref_nms([boxes[i].tolist() for i in idx], [scores[i].item() for i in idx], thr)]
    assert sorted(got.tolist()) == sorted(want)
    assert torch.all(scores[got][:-1] >= scores[got][1:])  # best first


def test_nms_edge_cases():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).numel() == 0
    same = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    assert nms(same, torch.tensor([0.2, 0.9]), 0.5).tolist() == [1]
    # Equal boxes of two classes both stay under batched NMS.
    assert sorted(batched_nms(same, torch.tensor([0.2, 0.9]), torch.tensor([0, 1]), 0.5).tolist()) == [0, 1]
    with pytest.raises(ValueError, match="boxes"):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)


# ---------------------------------------------------------------------- FCOS targets
@pytest.mark.parametrize("radius", [1.5, 0.0])
def test_fcos_targets_follow_the_paper(radius):
    H, W = 150, 200  # not multiples of 64: partial positions at the edges
    strides = (8, 16, 32, 64)
    ranges = default_size_ranges(strides)
    assert ranges == [(-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, math.inf)]
    # A large box with a small one inside it (min-area tie-break), a box crossing level ranges,
    # a thin one, and one that reaches the image border.
    boxes = [(10.0, 10.0, 190.0, 140.0), (40.0, 30.0, 90.0, 80.0), (120.0, 5.0, 180.0, 45.0),
             (60.0, 100.0, 70.0, 148.0), (0.0, 0.0, 24.0, 20.0), (50.0, 40.0, 84.0, 74.0)]
    labels = [0, 1, 2, 1, 0, 0]
    sizes = [(math.ceil(H / s), math.ceil(W / s)) for s in strides]
    locs, levels = level_locations(sizes, strides)
    st = torch.tensor(strides, dtype=torch.float32)[levels]
    rg = torch.tensor(ranges)[levels]
    cls, reg = fcos_targets(locs, st, rg, torch.tensor(boxes), torch.tensor(labels), 3, radius)
    want_cls, want_reg = ref_fcos_assign((H, W), strides, ranges, boxes, labels, 3, radius)
    assert cls.tolist() == want_cls
    pos = cls < 3
    assert torch.equal(reg[pos], torch.tensor([r for r in want_reg if r is not None]))
    # The hand-made case exercises every rule: positives on several levels, overlaps resolved to
    # the smaller box, and each box somewhere.
    assert len(set(levels[pos].tolist())) >= 2
    assert set(cls[pos].tolist()) == {0, 1, 2}
    # (68, 52) at stride 8 is a candidate of boxes 1 and 5 (near both centres, both in range):
    # the smaller, box 5, takes it; at (44, 34) only box 1 does.
    i = ((locs[:, 0] == 68) & (locs[:, 1] == 52) & (levels == 0)).nonzero().item()
    assert cls[i].item() == 0 and reg[i].tolist() == [18.0, 12.0, 16.0, 22.0]
    i = ((locs[:, 0] == 44) & (locs[:, 1] == 36) & (levels == 0)).nonzero().item()
    assert cls[i].item() == (1 if radius == 0 else 3)


def test_fcos_targets_without_boxes_are_background():
    locs, levels = level_locations([(2, 3)], (8,))
    cls, reg = fcos_targets(locs, torch.full((6,), 8.0), torch.tensor([[-1.0, 64.0]]).expand(6, 2),
                            torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 4)
    assert cls.tolist() == [4] * 6 and reg.abs().sum() == 0
    assert locs.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]


def test_detector_locations_are_fcos_positions():
    model = tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 40, 56))  # padded to 64 x 64 inside
    want = []
    for s in (8, 16, 32, 64):
        n = 64 // s
        want += [(s // 2 + j * s, s // 2 + i * s, s) for i in range(n) for j in range(n)]
    got = torch.cat((out["locations"], torch.tensor((8, 16, 32, 64))[out["levels"], None]), 1)
    assert got.tolist() == [list(w) for w in want]


# ---------------------------------------------------------------------- losses by hand
def test_focal_loss_by_hand():
    logits = torch.tensor([[0.5, -1.0], [2.0, -3.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    a, g = 0.25, 2.0
    want = (-a * (1 - sig(0.5)) ** g * math.log(sig(0.5))
            - (1 - a) * sig(-1.0) ** g * math.log(1 - sig(-1.0))
            - (1 - a) * sig(2.0) ** g * math.log(1 - sig(2.0))
            - a * (1 - sig(-3.0)) ** g * math.log(sig(-3.0)))
    assert focal_loss_sum(logits, targets, a, g).item() == pytest.approx(want, rel=1e-6)


def test_giou_and_centerness_by_hand():
    # Location (50, 50); prediction box [40, 30, 70, 60], target box [45, 40, 60, 80].
    pred = torch.tensor([[10.0, 20.0, 20.0, 10.0]])
    tgt = torch.tensor([[5.0, 10.0, 10.0, 30.0]])
    inter = (60 - 45) * (60 - 40)
    union = 30 * 30 + 15 * 40 - inter
    hull = (70 - 40) * (80 - 30)
    want = 1 - (inter / union - (hull - union) / hull)
    assert giou_loss_ltrb(pred, tgt).item() == pytest.approx(want, rel=1e-5)
    assert giou_loss_ltrb(tgt, tgt).item() == pytest.approx(0.0, abs=1e-6)
    assert centerness_target(tgt).item() == pytest.approx(math.sqrt(5 / 10 * 10 / 30), rel=1e-6)


def test_loss_normaliser_is_averaged_over_processes(monkeypatch):
    model = tiny()
    images, targets = synthetic()
    out = model(images)
    single = {k: v.item() for k, v in model.loss(out, targets).items()}
    # Two processes with the same batch: summed counts over two processes, halved.
    monkeypatch.setattr(vitdet_det, "get_world_size", lambda: 2)
    monkeypatch.setattr(vitdet_det, "all_reduce_sum", lambda t: t * 2)
    double = {k: v.item() for k, v in model.loss(out, targets).items()}
    assert double == pytest.approx(single, rel=1e-6)
    monkeypatch.setattr(vitdet_det, "all_reduce_sum", lambda t: t * 4)  # the other rank has 3x the positives
    assert model.loss(out, targets)["loss_cls"].item() == pytest.approx(single["loss_cls"] / 2, rel=1e-5)


# ---------------------------------------------------------------------- training
def test_loss_decreases_on_a_fixed_batch():
    model = tiny()
    images, targets = synthetic()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = model.loss(model(images), targets)
        opt.zero_grad()
        loss["loss"].backward()
        opt.step()
        losses.append(loss["loss"].item())
    assert set(loss) == {"loss", "loss_cls", "loss_giou", "loss_centerness"}
    assert losses[-1] < 0.8 * losses[0]


def test_tiny_detector_overfits_two_images():
    random.seed(0)
    model = tiny()
    images, targets = synthetic()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(60):
        loss = model.loss(model(images), targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        dets = model.postprocess(model(images), torch.tensor([[64, 64], [64, 64]]))
    found = total = 0
    for det, tgt in zip(dets, targets):
        # Recall at IoU 0.5 among confident detections of the right class.
        for box, lab in zip(tgt["boxes"].tolist(), tgt["labels"].tolist()):
            total += 1
            found += any(ref_iou(box, b) >= 0.5 and lab == c and s > 0.3
                         for b, c, s in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist()))
    assert found == total


# ---------------------------------------------------------------------- inference
@pytest.mark.parametrize("hw", [(37, 53), (64, 64), (90, 33)])
def test_any_input_size_and_boxes_inside_the_image(hw):
    model = tiny(score_thresh=0.0).eval()
    h, w = hw
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w))
    n = sum(math.ceil(h / 32) * math.ceil(w / 32) * (32 // s) ** 2 for s in (8, 16, 32)) \
        + math.ceil(h / 64) * math.ceil(w / 64)
    assert out["pred_logits"].shape == (2, n, 2) and out["pred_ltrb"].shape == (2, n, 4)
    assert out["pred_centerness"].shape == (2, n) and bool((out["pred_ltrb"] >= 0).all())
    sizes = torch.tensor([[h, w], [h - 5, w - 7]])  # the second image padded in its batch
    dets = model.postprocess(out, sizes, top_k=20)
    for det, (hh, ww) in zip(dets, sizes.tolist()):
        b = det["boxes"]
        assert 0 < len(b) <= 20 and det["labels"].dtype == torch.int64
        assert bool((b[:, 0::2] >= 0).all() and (b[:, 0::2] <= ww).all())
        assert bool((b[:, 1::2] >= 0).all() and (b[:, 1::2] <= hh).all())
        assert bool((det["scores"][:-1] >= det["scores"][1:]).all())


def test_postprocess_decodes_pixels_and_scores():
    model = tiny(num_classes=3)
    locations, levels = level_locations([(2, 2), (1, 1)], (8, 16))
    logits = torch.full((1, 5, 3), -10.0)
    ltrb = torch.zeros(1, 5, 4)
    ctr = torch.full((1, 5), 10.0)
    # Position (12, 4) of level 0: class 2, p = 0.8, centerness 0.5, box [2, 1, 20, 9].
    logits[0, 1, 2] = math.log(0.8 / 0.2)
    ctr[0, 1] = 0.0
    ltrb[0, 1] = torch.tensor([10.0, 3.0, 8.0, 5.0])
    # Position (8, 8) of level 1: the same class and box, score 0.6 * 0.5 < 0.8 * 0.5 -> suppressed.
    logits[0, 4, 2] = math.log(0.6 / 0.4)
    ctr[0, 4] = 0.0
    ltrb[0, 4] = torch.tensor([6.0, 7.0, 12.0, 1.0])
    # Position (4, 12) of level 0: another class on that box; kept.
    logits[0, 2, 0] = 0.0
    ltrb[0, 2] = torch.tensor([2.0, 11.0, 16.0, 3.0])
    out = {"pred_logits": logits, "pred_ltrb": ltrb, "pred_centerness": ctr, "locations": locations, "levels": levels}
    model.strides = (8, 16)
    det = model.postprocess(out, torch.tensor([[16, 18]]))[0]
    sig10 = 1 / (1 + math.exp(-10))
    assert det["labels"].tolist() == [0, 2]
    assert det["scores"].tolist() == pytest.approx([math.sqrt(0.5 * sig10), math.sqrt(0.8 * 0.5)], rel=1e-5)
    assert det["boxes"].tolist() == [[2.0, 1.0, 18.0, 15.0], [2.0, 1.0, 18.0, 9.0]]  # clipped to w = 18


# ---------------------------------------------------------------------- construction
def test_registry_rebuild_and_backbones():
    assert detector_entry("vitdet_fcos").default_backbone == "vitdet_small_patch16_224"
    model = tiny()
    assert model.stride == 32 and model.frozen_unused == ["backbone.norm.weight", "backbone.norm.bias"]
    again = create_detector(**model.model_args)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    # A plain ViT (patch 16: deconvolution to stride 8) with its arguments carried by model_args.
    vit = tiny(backbone="test_vit", backbone_args={"depth": 2, "patch_size": 16})
    assert isinstance(vit.neck.stages[0][0][0], torch.nn.ConvTranspose2d)
    assert vit.frozen_unused == ["backbone.norm.weight", "backbone.norm.bias"]
    with torch.no_grad():
        assert vit.eval()(torch.randn(1, 3, 40, 24))["locations"].shape[0] == 2 * 16 + 2 * 4 + 2 + 1
    assert create_detector(**json.loads(json.dumps(vit.model_args))).model_args == vit.model_args
    # A hierarchical backbone gives its own stage maps.
    swin = tiny(backbone="test_swin")
    assert not swin.neck.isotropic
    with torch.no_grad():
        out = swin.eval()(torch.randn(1, 3, 48, 40))
    assert out["pred_logits"].shape[1] == out["locations"].shape[0]
    with pytest.raises(ConfigError, match="strides"):
        tiny(strides=(8, 24))
    with pytest.raises(ConfigError, match="size_ranges"):
        tiny(size_ranges=[(0, 64)])
    with pytest.raises(ConfigError, match="images"):
        model(torch.randn(1, 1, 32, 32))


def test_layer_groups_and_bad_labels():
    from vitkit.engine.optim import layer_ids

    model = tiny()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ids, n = layer_ids(names, model.group_matcher())
    depth = len(model.backbone.blocks)
    assert ids["backbone.blocks.0.attn.qkv.weight"] < ids[f"backbone.blocks.{depth - 1}.attn.qkv.weight"]
    assert ids["head.cls_logits.weight"] == ids["neck.stages.0.1.0.weight"] == n - 1
    images, targets = synthetic(1)
    targets[0]["labels"] = torch.tensor([0, 2])
    with pytest.raises(DataError, match="labels"):
        model.loss(model(images), targets)
