"""What a detection dataset holds per image, and how bad annotations are cleaned and reported.

Both formats (:mod:`.det_formats`) clean boxes the same way (:func:`clean_boxes`):

- a box partly outside its image is clipped to it (counted when it overshoots by more than
  :data:`EDGE_TOLERANCE` pixels: exported files often overshoot by a rounding error), a box
  wholly outside is dropped;
- a box of zero or negative width or height, one that is not four finite numbers, or one of a
  category the dataset does not list is dropped.

Each kind is counted (:class:`Problems`), logged once, and judged against
``data.max_bad_fraction`` of the images.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import DataError

log = logging.getLogger("vitkit.data")

EDGE_TOLERANCE = 1.0
_KINDS = {
    "clipped": "boxes partly outside the image, clipped",
    "outside": "boxes wholly outside the image, dropped",
    "zero_area": "boxes of zero width or height, dropped",
    "malformed": "boxes that are not 4 finite numbers, dropped",
    "unknown_category": "boxes of an unknown category, dropped",
    "unknown_image": "annotations of an image id not listed in 'images', dropped",
    "missing_image": "images whose file is missing, left out",
    "bad_xml": "XML files that cannot be parsed, their images left out",
}


@dataclass
class Record:
    """One image: its file (None when missing), boxes float32 (K, 4) xyxy, labels int64 (K,), id, (H, W)."""

    file: str | None
    boxes: np.ndarray
    labels: np.ndarray
    image_id: int
    size: tuple[int, int] | None
    name: str
    ann: str = ""  # the annotation file, where each image has its own (VOC XML)


@dataclass
class Problems:
    """Bad annotations by kind (see the module notes), with a few example names each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    images: set = field(default_factory=set)  # names of images with any problem

    def add(self, kind: str, name: str, n: int = 1, image: bool = True) -> None:
        self.counts[kind] += n
        ex = self.examples.setdefault(kind, [])
        if len(ex) < 3 and name not in ex:
            ex.append(name)
        if image:
            self.images.add(name)

    def lines(self) -> list[str]:
        return [f"{self.counts[k]} {_KINDS[k]} (e.g. {', '.join(self.examples[k])})" for k in _KINDS if self.counts[k]]

    def check(self, n_images: int, max_bad_fraction: float, where: str) -> None:
        bad = len(self.images)
        if n_images and bad / n_images > max_bad_fraction:
            raise DataError(
                f"{where}: {bad} of {n_images} images ({bad / n_images:.1%}) have bad annotations, more than "
                f"data.max_bad_fraction={max_bad_fraction}:\n  " + "\n  ".join(self.lines())
                + "\nFix the annotations (boxes in pixels of the image, categories listed, files present), or "
                "raise data.max_bad_fraction to train without them")


def clean_boxes(raw: np.ndarray, known: np.ndarray, size: tuple[int, int] | None, name: str,
                problems: Problems) -> np.ndarray:
    """The rows of ``raw`` (float (K, 4) xyxy) to keep, clipped in place to ``size`` (H, W); see the module notes."""
    keep = known.copy()
    if (~known).any():
        problems.add("unknown_category", name, int((~known).sum()))
    finite = np.isfinite(raw).all(1)
    if (~finite & keep).any():
        problems.add("malformed", name, int((~finite & keep).sum()))
    keep &= finite
    flat = keep & ((raw[:, 2] <= raw[:, 0]) | (raw[:, 3] <= raw[:, 1]))
    if flat.any():
        problems.add("zero_area", name, int(flat.sum()))
    keep &= ~flat
    if size is not None:
        h, w = size
        over = np.maximum.reduce([-raw[:, 0], -raw[:, 1], raw[:, 2] - w, raw[:, 3] - h])
        raw[:, 0::2] = np.clip(raw[:, 0::2], 0, w)
        raw[:, 1::2] = np.clip(raw[:, 1::2], 0, h)
        gone = keep & ((raw[:, 2] <= raw[:, 0]) | (raw[:, 3] <= raw[:, 1]))
        if gone.any():
            problems.add("outside", name, int(gone.sum()))
        keep &= ~gone
        clipped = keep & (over > EDGE_TOLERANCE)
        if clipped.any():
            problems.add("clipped", name, int(clipped.sum()))
    return keep


def header_size(path: str) -> tuple[int, int] | None:
    """(H, W) from the image file's header (not decoded), or None when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except Exception:  # noqa: BLE001 - a broken file is the scan's to report
        return None


def make_record(path: str, raw, cat, image_id: int, size, problems: Problems, ann: str = "") -> Record:
    """The :class:`Record` of image ``path`` from raw xyxy boxes and class indices (-1: unknown), cleaned."""
    raw = np.asarray(raw, np.float64).reshape(-1, 4)
    labels = np.asarray(cat, np.int64).reshape(-1)
    keep = clean_boxes(raw, labels >= 0, size, path, problems)
    return Record(path, raw[keep].astype(np.float32), labels[keep], image_id, size, path, ann)


def report(problems: Problems, where: str) -> None:
    """Log the bad annotations once, one line per kind."""
    for line in problems.lines():
        log.warning(f"{where}: {line}")
