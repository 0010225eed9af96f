"""Object detection datasets: images with boxes and class labels.

``build_detection_dataset`` opens COCO JSON or Pascal VOC XML (see :mod:`.det_formats` for the
layouts, :mod:`.det_annotations` for how bad annotations are cleaned) or the built-in ``scenes[:N]``, and returns a
dataset whose ``load(i)`` gives ``(image, {"boxes": float32 (K, 4) xyxy pixels, "labels": int64
(K,) in [0, num_classes), "image_id": int}, bad_files)``. Classes never include a background;
``category_ids[c]`` is the COCO id of class ``c`` (1..C for VOC and scenes).

Splits: COCO's ``instances_train*.json`` / ``instances_val*.json`` and VOC's
``ImageSets/Main/{train,val}.txt`` are used as given; otherwise the images are split by a seeded
fraction, stratified by the rarest class in each image so rare classes reach the val split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import DataError, PathNotFoundError
from .dense import DenseDataset, _builtin
from .det_annotations import Problems, Record, report
from .det_formats import DETECT_LAYOUTS, DetLayout, find_detection_layout, read_coco, read_voc
from .images import BadImageError, decode_image
from .inspect import _GRAY_TOLERANCE, DatasetInfo
from .scenes import SCENE_CLASSES, ScenesDataset
from .splits import check_split, stratified_split


@dataclass
class DetectionInfo(DatasetInfo):
    """:class:`DatasetInfo` of detection data: ``class_counts`` are training boxes per class;
    ``boxes_per_image`` the mean over the training images, ``box_area_frac`` the median box area
    as a fraction of its image's, and the box counts of both splits."""

    boxes_per_image: float = 0.0
    box_area_frac: float = 0.0
    n_boxes_train: int = 0
    n_boxes_val: int = 0
    category_ids: tuple[int, ...] = ()


def _box_stats(sizes, boxes) -> dict:
    """``typical_size``, ``boxes_per_image`` and ``box_area_frac`` of sampled images."""
    if not sizes:
        return {"typical_size": (0, 0), "boxes_per_image": 0.0, "box_area_frac": 0.0}
    fracs = [float(f) for (h, w), b in zip(sizes, boxes)
             for f in (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / float(h * w)]
    return {"typical_size": (int(np.median([s[0] for s in sizes])), int(np.median([s[1] for s in sizes]))),
            "boxes_per_image": float(np.mean([len(b) for b in boxes])),
            "box_area_frac": float(np.median(fracs)) if fracs else 0.0}


class DetSource:
    """The image files of a detection dataset with their annotations (one :class:`Record` each)."""

    scannable = True
    what = "image files"

    def __init__(self, records: list[Record]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def name(self, j: int) -> str:
        return self.records[j].name

    def image(self, j: int, in_chans: int) -> Image.Image:
        rec = self.records[j]
        img = decode_image(rec.file, in_chans, name=rec.file)
        if rec.size is not None and (img.height, img.width) != tuple(rec.size):
            raise BadImageError(f"{rec.file}: the image is {img.width}x{img.height} but its annotations say "
                                f"{rec.size[1]}x{rec.size[0]}; the boxes would not fit it")
        return img

    def pair(self, j: int, in_chans: int) -> tuple[Image.Image, dict]:
        rec = self.records[j]
        return self.image(j, in_chans), {"boxes": rec.boxes.copy(), "labels": rec.labels.copy(),
                                         "image_id": int(rec.image_id)}


class DetectionDataset(DenseDataset):
    """Images with boxes from COCO JSON (``format="coco"``) or Pascal VOC XML (``"voc"``).

    ``load(i)`` returns ``(image, target, bad_files)``; an unreadable image is replaced by a
    seeded other one and named in ``bad_files``. ``exclude(names)`` leaves out images found
    broken before training. ``note`` is a sentence for the plan when the folder held two
    annotation formats; ``notes`` adds how the annotations were read and what was left out.
    """

    task = "detect"

    def __init__(self, source: DetSource, *, classes: list[str], category_ids: list[int], in_chans: int = 3,
                 format: str = "", max_bad_fraction: float = 0.05, notes: list[str] | None = None, note: str = ""):
        super().__init__(source, task="detect", classes=classes, in_chans=in_chans, format=format,
                         max_bad_fraction=max_bad_fraction, notes=notes)
        self.category_ids = list(category_ids)
        self.note = note

    def n_boxes(self) -> int:
        return int(sum(len(self.source.records[j].boxes) for j in self.indices))

    def class_boxes(self) -> list[int]:
        labels = [self.source.records[j].labels for j in self.indices]
        allof = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        return np.bincount(allof, minlength=self.num_classes).tolist()

    def stats(self, max_samples: int = 200, seed: int = 0) -> dict:
        """Sizes and boxes of up to ``max_samples`` images, from the annotations (nothing decoded)."""
        recs = [self.source.records[self.indices[int(i)]]
                for i in np.random.default_rng(seed).permutation(len(self))[:max_samples]]
        recs = [r for r in recs if r.size is not None]
        out = _box_stats([r.size for r in recs], [r.boxes for r in recs])
        return {**out, "in_chans": self.in_chans, "num_classes": self.num_classes, "n": len(self)}

    def describe(self) -> str:
        head = f"{self.format}: {len(self)} images, {self.n_boxes()} boxes, {self.num_classes} class{'es' if self.num_classes != 1 else ''}"
        return "; ".join([head, *self.notes])

    def __repr__(self) -> str:
        return f"DetectionDataset(format={self.format!r}, n={len(self)}, classes={self.num_classes})"


# Rendered scenes are alike: this many describe them, at a fraction of the rendering time.
_SCENE_SAMPLES = 64


class SceneDetection(ScenesDataset):
    """The built-in multi-shape scenes as a detection set: each visible shape's box and class.

    Classes are the shapes (no background: the scenes' label ``k`` is class ``k - 1`` here),
    ``category_ids`` 1..C; ``image_id`` is the scene's index in its split.
    """

    def __init__(self, n: int = 2000, split: str = "train", seed: int = 0, img_size: int = 128, in_chans: int = 3,
                 *, max_instances: int = 4):
        super().__init__(n, split, seed, img_size, in_chans, task="detect", max_instances=max_instances)
        self.classes = list(SCENE_CLASSES[1:])
        self.num_classes = len(self.classes)
        self.category_ids = list(range(1, self.num_classes + 1))
        self.note, self.notes = "", []

    def load(self, i: int) -> tuple[Image.Image, dict, list[str]]:
        out = self.render(i)
        return self._pil(out["image"]), {"boxes": out["boxes"].astype(np.float32),
                                         "labels": out["labels"].astype(np.int64) - 1,
                                         "image_id": int(self.indices[i])}, []

    def _sample_boxes(self, max_samples: int, seed: int) -> list[dict]:
        max_samples = min(max_samples, _SCENE_SAMPLES)
        key = (max_samples, seed, tuple(self.indices))
        if getattr(self, "_sampled", (None,))[0] != key:  # stats, n_boxes and class_boxes share one render
            self._sampled = (key, [self.load(int(i))[1]
                                   for i in np.random.default_rng(seed).permutation(len(self))[:max_samples]])
        return self._sampled[1]

    def stats(self, max_samples: int = 200, seed: int = 0) -> dict:
        targets = self._sample_boxes(max_samples, seed)
        out = _box_stats([(self.img_size, self.img_size)] * len(targets), [t["boxes"] for t in targets])
        return {**out, "in_chans": self.in_chans, "num_classes": self.num_classes, "n": len(self)}

    def n_boxes(self, max_samples: int = 200) -> int:
        """Exact up to 64 scenes, estimated from 64 above; ``class_boxes`` counts those 64."""
        targets = self._sample_boxes(max_samples, 0)
        return int(round(np.mean([len(t["boxes"]) for t in targets]) * len(self))) if targets else 0

    def class_boxes(self, max_samples: int = 200) -> list[int]:
        labels = [t["labels"] for t in self._sample_boxes(max_samples, 0)]
        return np.bincount(np.concatenate(labels), minlength=self.num_classes).tolist() if labels else []


_PARSED: dict[tuple, list] = {}


def _stat(path: str):
    try:
        return os.stat(path)
    except OSError:
        return None


def _parse(layout: DetLayout, max_bad_fraction: float):
    """Records by split key, classes, ids and notes; parsed, judged and reported once per files."""
    files = sorted(layout.coco.values()) if layout.format == "coco" else [x for _, x in layout.voc_pairs]
    stat = [(f, st.st_mtime_ns, st.st_size) for f in files if (st := _stat(f))]
    key = (layout.format, layout.root, tuple(stat))
    if key not in _PARSED:
        problems = Problems()
        notes = [layout.note] if layout.note else []
        if layout.format == "coco":
            recs, classes, ids = read_coco(layout.root, layout.coco, problems)
        else:
            everything, classes, ids, one_based = read_voc(layout, problems)
            recs = {"all": everything}
            notes.append("VOC boxes read as 1-based pixel indices (xmin, ymin - 1)" if one_based
                         else "VOC boxes read as 0-based pixel coordinates (some box starts at 0)")
        if len(_PARSED) >= 4:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[key] = [recs, classes, ids, notes + problems.lines(), problems, False]
    entry = _PARSED[key]
    recs, classes, ids, notes, problems, reported = entry
    n_images = sum(len(r) for r in recs.values()) + problems.counts["missing_image"] + problems.counts["bad_xml"]
    problems.check(n_images, max_bad_fraction, layout.root)
    if not reported:
        report(problems, layout.root)
        entry[-1] = True
    return recs, classes, ids, notes


def _seeded_split(recs: list[Record], split: str, num_classes: int, val_fraction: float, seed: int) -> list[Record]:
    counts = np.bincount(np.concatenate([r.labels for r in recs] or [np.zeros(0, np.int64)]), minlength=num_classes)
    # Each image stands for its rarest class, so that rare classes reach the val split too.
    rarest = [int(r.labels[np.argmin(counts[r.labels])]) if len(r.labels) else -1 for r in recs]
    train, val = stratified_split(rarest, val_fraction, seed)
    if not val and len(recs) > 1:
        val = [int(np.random.default_rng(seed).integers(len(recs)))]
        train = [i for i in train if i != val[0]]
    return [recs[i] for i in (train if split == "train" else val)]


def _scenes(path: str, split: str, seed: int, in_chans: int) -> SceneDetection:
    scenes = _builtin(path, "detect", split, seed, in_chans)  # parses scenes[:N] and sizes the split
    return SceneDetection(len(scenes), split=split, seed=seed, img_size=scenes.img_size, in_chans=in_chans)


def build_detection_dataset(path: str, split: str = "train", *, val_fraction: float = 0.1, seed: int = 0,
                            in_chans: int = 3, max_bad_fraction: float = 0.05):
    """Open the ``split`` ("train" | "val") of the detection data at ``path``: a folder with COCO
    JSON or Pascal VOC XML, one COCO JSON file, or the built-in ``scenes[:N]``.

    Bad annotations are cleaned, counted per kind and logged once (``notes`` lists them);
    images whose file is missing are left out.

    Raises:
        PathNotFoundError: nothing at ``path``.
        DataError: no detection annotations at ``path``; no images in the split; or more than
            ``max_bad_fraction`` of the images have bad annotations (the message counts each kind).
        ConfigError: a bad ``split`` or ``val_fraction``.
    """
    check_split(split, val_fraction)
    path = str(path)
    if path.partition(":")[0] == "scenes" and not os.path.exists(path):
        return _scenes(path, split, seed, in_chans)
    if not os.path.exists(path):
        raise PathNotFoundError(f"no such file or folder: {path!r}; check the path")
    layout = find_detection_layout(path)
    if layout is None:
        raise DataError(f"{path}: no detection annotations found; the layouts read are {DETECT_LAYOUTS}")
    recs, classes, ids, notes = _parse(layout, max_bad_fraction)
    if not classes:
        raise DataError(f"{path}: the annotations name no object classes (COCO 'categories' or VOC <object><name>)")
    if split in recs:
        chosen = recs[split]
    elif layout.voc_splits:
        chosen = [r for r in recs["all"] if r.ann in layout.voc_splits[split]]
    else:
        chosen = _seeded_split(recs["all"], split, len(classes), val_fraction, seed)
    if not chosen:
        raise DataError(f"{path}: the {split} split of the {layout.format} annotations holds no images")
    return DetectionDataset(DetSource(chosen), classes=classes, category_ids=ids, in_chans=in_chans,
                            format=layout.format, max_bad_fraction=max_bad_fraction, notes=notes, note=layout.note)


def describe_detection(train, val, max_samples: int = 200, seed: int = 0, where: str = "the dataset") -> DetectionInfo:
    """Sizes, channels and boxes of the built ``train`` split (up to ``max_samples`` sampled
    images), box counts of both splits; ``in_chans`` is 1 when every sampled image is gray."""
    gray, n_seen = True, 0
    for i in np.random.default_rng(seed).permutation(len(train))[:max_samples]:
        img, _, _ = train.load(int(i))
        n_seen += 1
        if img.mode != "L":
            a = np.asarray(img, dtype=np.int16)
            gray = bool(np.abs(a - a.mean(axis=2, keepdims=True)).max() <= _GRAY_TOLERANCE)
            if not gray:
                break
    if not n_seen:
        raise DataError(f"{where}: no images to describe")
    s = train.stats(max_samples, seed)
    notes = tuple(getattr(train, "notes", ()))
    return DetectionInfo(
        num_classes=train.num_classes, in_chans=1 if gray else 3, typical_size=tuple(s["typical_size"]),
        n_train=len(train), n_val=len(val), format=train.format, classes=tuple(train.classes),
        class_counts=tuple(train.class_boxes()), task="detect", notes=notes,
        boxes_per_image=s["boxes_per_image"], box_area_frac=s["box_area_frac"],
        n_boxes_train=train.n_boxes(), n_boxes_val=val.n_boxes(), category_ids=tuple(train.category_ids))
