"""COCO detection metrics (AP over IoU 0.50:0.95, AP50, AP75, per-size AP, AR@100) through pycocotools."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch

from ..engine.distributed import all_gather_object, get_rank, is_dist
from ..engine.evaluators import Evaluator
from ..errors import ConfigError, DataError

# pycocotools' summary order (COCOeval.stats) of the metrics reported.
_STATS = {"ap": 0, "ap50": 1, "ap75": 2, "ap_small": 3, "ap_medium": 4, "ap_large": 5, "ar100": 8}


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ConfigError("COCO evaluation needs pycocotools: pip install 'vitkit[detect]'") from None
    return COCO, COCOeval


def _np(x, shape=None) -> np.ndarray:
    a = x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    return a.reshape(shape) if shape is not None else a


def _key(ids, i: int, kind: str):
    """The identity of image ``i`` of a batch by ``ids`` (image ids or dataset indices); None when unknown (< 0)."""
    if ids is None:
        return None
    v = int(ids[i].item() if isinstance(ids[i], torch.Tensor) else ids[i])
    return (kind, v) if v >= 0 else None


class CocoEvaluator(Evaluator):
    """COCO box AP of a detector over a validation set, as pycocotools' ``COCOeval`` computes it.

    ``update(batch, outputs)``: ``outputs["detections"]`` is a list (one per image) of dicts
    with ``"boxes"`` (N, 4) xyxy, ``"scores"`` and ``"labels"`` (in ``[0, C)``), in pixels of
    the batch's images; the batch holds the ground truth ``"boxes"`` / ``"labels"`` (lists of
    per-image tensors), ``"size"`` (B, 2) each image's true (h, w) in the batch and
    ``"orig_size"`` (B, 2) its original (h, w). ``"image_id"`` (or else the dataset's
    ``"index"``; optional, negative for unknown) identifies an image seen twice (a distributed
    sampler pads its shards with repeats), counted once. Boxes are scaled back to the original
    image per axis, so areas (small < 32², medium, large > 96²) are COCO's. Category ids are
    1..C, no crowd regions.

    ``compute()`` returns ``ap`` (IoU 0.50:0.95, the primary), ``ap50``, ``ap75``, ``ap_small``,
    ``ap_medium``, ``ap_large`` and ``ar100``; pycocotools' -1 marks a metric without ground
    truth (e.g. ``ap_small`` when no object is small). No detection at all scores 0. Afterwards
    ``per_class_ap`` lists each class's AP (None for a class absent from the ground truth).
    Under DDP every process's images are gathered and every process gets the same metrics.
    """

    primary = "ap"
    higher_is_better = True

    def __init__(self, classes: list[str]):
        if not classes:
            raise ConfigError("CocoEvaluator needs the list of class names (at least one class)")
        self.classes = list(classes)
        self.per_class_ap: list[float | None] | None = None
        self.reset()

    def reset(self) -> None:
        self.records: list[dict] = []
        self._seen = 0

    def update(self, batch: dict, outputs: dict) -> None:
        dets = outputs["detections"]
        n = len(batch["boxes"])
        if len(dets) != n:
            raise DataError(f"the detector returned {len(dets)} detection lists for a batch of {n} images")
        size = _np(batch["size"], (n, 2))
        orig = _np(batch["orig_size"], (n, 2)) if "orig_size" in batch else size
        ids, index = batch.get("image_id"), batch.get("index")
        for i in range(n):
            h, w = size[i]
            scale = np.array([orig[i, 1] / w, orig[i, 0] / h] * 2)
            d = dets[i]
            key = _key(ids, i, "image") or _key(index, i, "index") or ("anon", get_rank(), self._seen)
            self._seen += 1
            self.records.append({
                "key": key,
                "size": (int(round(orig[i, 0])), int(round(orig[i, 1]))),
                "gt_boxes": _np(batch["boxes"][i], (-1, 4)) * scale,
                "gt_labels": _np(batch["labels"][i], (-1,)).astype(np.int64),
                "boxes": _np(d["boxes"], (-1, 4)) * scale,
                "scores": _np(d["scores"], (-1,)),
                "labels": _np(d["labels"], (-1,)).astype(np.int64),
            })

    def _check_labels(self, labels: np.ndarray, what: str) -> None:
        c = len(self.classes)
        if labels.size and (labels.min() < 0 or labels.max() >= c):
            bad = int(labels.max() if labels.max() >= c else labels.min())
            raise DataError(f"{what} holds class {bad}, outside the {c} classes 0..{c - 1}: "
                            "the detector's num_classes and the evaluator's class list disagree")

    def coco_json(self, records: list[dict]) -> tuple[dict, list[dict]]:
        """The ground truth as a COCO dataset dict and the detections as a COCO results list."""
        images, anns, dets = [], [], []
        for img_id, r in enumerate(records, start=1):
            h, w = r["size"]
            images.append({"id": img_id, "height": h, "width": w})
            self._check_labels(r["gt_labels"], "the ground truth")
            self._check_labels(r["labels"], "a detection")
            for box, label in zip(r["gt_boxes"], r["gt_labels"]):
                x0, y0, x1, y1 = box.tolist()
                anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(label) + 1,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
            for box, score, label in zip(r["boxes"], r["scores"], r["labels"]):
                x0, y0, x1, y1 = box.tolist()
                dets.append({"image_id": img_id, "category_id": int(label) + 1,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
        categories = [{"id": k + 1, "name": name} for k, name in enumerate(self.classes)]
        return {"images": images, "annotations": anns, "categories": categories}, dets

    def _gathered(self) -> list[dict]:
        records = [r for part in all_gather_object(self.records) for r in part] if is_dist() else self.records
        # A distributed sampler repeats images to even out the shards: count each once.
        out, seen = [], set()
        for r in records:
            if r["key"] not in seen:
                seen.add(r["key"])
                out.append(r)
        return out

    def compute(self) -> dict[str, float]:
        records = self._gathered()
        if not records:
            self.per_class_ap = None
            return {}
        COCO, COCOeval = _pycocotools()
        gt_json, dets = self.coco_json(records)
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = gt_json
            gt.createIndex()
            if dets:
                dt = gt.loadRes(dets)
            else:  # loadRes rejects an empty list; an empty result set scores 0 wherever there is ground truth
                dt = COCO()
                dt.dataset = {"images": list(gt_json["images"]), "categories": gt_json["categories"],
                              "annotations": []}
                dt.createIndex()
            ev = COCOeval(gt, dt, "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # precision: (IoU thresholds, recall points, classes, area ranges, max dets); area "all",
        # 100 detections; -1 where a class has no ground truth.
        precision = ev.eval["precision"][:, :, :, 0, -1]
        self.per_class_ap = []
        for k in range(len(self.classes)):
            p = precision[:, :, k]
            self.per_class_ap.append(float(p[p > -1].mean()) if (p > -1).any() else None)
        return {name: float(ev.stats[i]) for name, i in _STATS.items()}
