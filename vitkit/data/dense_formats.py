"""Finding segmentation and depth datasets in a folder, by file names only.

A layout lists, per split, the (image, target) file pairs of a dataset; nothing is decoded here.
An image without its mask or a mask without its image stays in the list with the missing side
None, so the pre-training scan reports it beside the unreadable files (see :mod:`.dense`).

Segmentation layouts (``find_segment_layout``):

- CamVid: ``train/`` + ``trainannot/``, ``val/`` + ``valannot/`` (``test/`` + ``testannot/`` is
  not read for training);
- Pascal VOC: ``JPEGImages/`` + ``SegmentationClass/`` (palette PNGs), split by
  ``ImageSets/Segmentation/{train,val}.txt``; 255 = void; the 21 VOC classes;
- ADE20K: ``images/{training,validation}/`` + ``annotations/{training,validation}/``; 0 = void,
  the other values are classes shifted down by one;
- ``images/`` + ``masks/`` (or ``labels/``, ``annotations/``) with matching file stems, either flat
  (split by a seeded fraction) or with ``train/`` and ``val/`` subfolders in both.

Depth (``find_depth_layout``): ``images/`` + ``depth/`` with matching stems (16-bit PNG in
millimetres or ``.npy`` float metres), flat or with ``train/`` + ``val/`` subfolders.

A root holding a single folder (an archive extracted as ``camvid/``, ``VOCdevkit/VOC2012``) is
looked into.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .images import IMAGE_EXTENSIONS
from .paths import is_system_path

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
MASK_DIRS = ("masks", "labels", "annotations")
SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "validation", "valid")}
DENSE_LAYOUTS = (
    "CamVid (train/ + trainannot/, val/ + valannot/), images/ + masks/ (or labels/, annotations/) with matching "
    "file names, Pascal VOC (JPEGImages/ + SegmentationClass/ + ImageSets/Segmentation/*.txt), ADE20K "
    "(images/training + annotations/training)"
)
DEPTH_LAYOUTS = "images/ + depth/ with matching file names (16-bit PNG in millimetres, or .npy in metres)"

Pair = tuple[str | None, str | None]


@dataclass
class DenseLayout:
    """The pairs a folder holds: ``splits`` maps "train"/"val" to pairs, or ``pairs`` (no split of
    its own) is split by a seeded fraction. ``ignore`` is the format's void value (None if it
    names none); ``shift`` moves every class down by one (ADE20K's 0 = void)."""

    format: str
    root: str
    task: str = "segment"
    splits: dict[str, list[Pair]] = field(default_factory=dict)
    pairs: list[Pair] = field(default_factory=list)
    classes: tuple[str, ...] = ()
    ignore: int | None = None
    shift: int = 0
    where: str = ""  # for the console: which folders hold what
    classes_from: str = "classes.txt"

    def all_pairs(self) -> list[Pair]:
        return self.pairs + [p for s in self.splits.values() for p in s]


def list_names(path: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(path) if not is_system_path(n))
    except OSError:
        return []


def subfolders(path: str) -> dict[str, str]:
    """Lower-cased name -> real name of the folders in ``path``."""
    return {n.lower(): n for n in list_names(path) if os.path.isdir(os.path.join(path, n))}


def _files(folder: str, exts: tuple[str, ...]) -> dict[str, str]:
    """stem -> path of the files in ``folder`` with one of ``exts``."""
    out = {}
    for n in list_names(folder):
        stem, ext = os.path.splitext(n)
        if ext.lower() in exts and os.path.isfile(os.path.join(folder, n)):
            out.setdefault(stem, os.path.join(folder, n))
    return out


def _pair_up(image_dir: str, target_dir: str, target_exts: tuple[str, ...]) -> list[Pair]:
    images, targets = _files(image_dir, IMAGE_EXTENSIONS), _files(target_dir, target_exts)
    return [(images.get(s), targets.get(s)) for s in sorted(set(images) | set(targets))]


def _matches(pairs: list[Pair]) -> bool:
    """True when the two folders mostly hold the same stems (not two unrelated image folders)."""
    both = sum(1 for i, t in pairs if i and t)
    return both > 0 and both >= 0.5 * len(pairs)


def dataset_root(path: str) -> str:
    """``path``, or its only folder when it holds nothing else (an extracted archive's top folder)."""
    for _ in range(2):
        names = list_names(path)
        if len(names) == 1 and os.path.isdir(os.path.join(path, names[0])):
            path = os.path.join(path, names[0])
        elif any(n.lower() in ("voc2012", "voc2007") for n in names) and "jpegimages" not in subfolders(path):
            path = os.path.join(path, next(n for n in names if n.lower() in ("voc2012", "voc2007")))
        else:
            break
    return path


def _read_classes(root: str) -> tuple[str, ...]:
    for where in (root, os.path.dirname(root.rstrip(os.sep))):
        f = os.path.join(where, "classes.txt")
        if os.path.isfile(f):
            with open(f, encoding="utf-8") as fh:
                return tuple(line.strip() for line in fh if line.strip())
    return ()


def _split_pairs(root: str, dirs: dict[str, str], image_name: str, target_name: str,
                 exts: tuple[str, ...]) -> tuple[dict[str, list[Pair]], list[Pair]]:
    """Pairs of ``root/image_name`` and ``root/target_name``: per split when both have split folders."""
    img_root, tgt_root = os.path.join(root, dirs[image_name]), os.path.join(root, dirs[target_name])
    img_sub, tgt_sub = subfolders(img_root), subfolders(tgt_root)
    splits = {}
    for split, names in SPLIT_NAMES.items():
        for n in names:
            if n in img_sub and n in tgt_sub:
                splits[split] = _pair_up(os.path.join(img_root, img_sub[n]), os.path.join(tgt_root, tgt_sub[n]), exts)
                break
    if "train" in splits:
        return splits, []
    return {}, _pair_up(img_root, tgt_root, exts)


def find_segment_layout(path: str) -> DenseLayout | None:
    """The segmentation layout at ``path`` (see the module notes), or None."""
    if not os.path.isdir(path):
        return None
    root = dataset_root(path)
    dirs = subfolders(root)
    classes = _read_classes(root)
    png = (".png",)
    if "train" in dirs and "trainannot" in dirs:
        splits = {s: _pair_up(os.path.join(root, dirs[s]), os.path.join(root, dirs[s + "annot"]), png)
                  for s in ("train", "val") if s in dirs and s + "annot" in dirs}
        if _matches(splits["train"]):
            return DenseLayout("camvid", root, splits=splits, classes=classes,
                               where="masks in trainannot/ beside train/")
    if "jpegimages" in dirs and "segmentationclass" in dirs:
        layout = _voc_layout(root, dirs, classes or VOC_CLASSES)
        layout.classes_from = "classes.txt" if classes else "the Pascal VOC class list"
        return layout
    if "images" in dirs:
        for m in MASK_DIRS:
            if m not in dirs:
                continue
            splits, pairs = _split_pairs(root, dirs, "images", m, png)
            if not _matches(pairs or splits.get("train", [])):
                continue
            ade = m == "annotations" and "training" in subfolders(os.path.join(root, dirs[m]))
            if ade:
                return DenseLayout("ade20k", root, splits=splits, pairs=pairs, classes=classes, ignore=0, shift=1,
                                   where="ADE20K masks in annotations/training beside images/training")
            return DenseLayout("image-mask folders", root, splits=splits, pairs=pairs, classes=classes,
                               where=f"masks in {dirs[m]}/ beside images/ with matching names")
    return None


def _voc_layout(root: str, dirs: dict[str, str], classes: tuple[str, ...]) -> DenseLayout:
    images = _files(os.path.join(root, dirs["jpegimages"]), IMAGE_EXTENSIONS)
    masks = _files(os.path.join(root, dirs["segmentationclass"]), (".png",))
    sets = os.path.join(root, "ImageSets", "Segmentation")
    splits: dict[str, list[Pair]] = {}
    for split in ("train", "val"):
        f = os.path.join(sets, f"{split}.txt")
        if os.path.isfile(f):
            with open(f, encoding="utf-8") as fh:
                stems = [line.split()[0] for line in fh if line.strip()]
            splits[split] = [(images.get(s), masks.get(s)) for s in stems]
    # JPEGImages holds the detection images too: only images with a mask belong to the segmentation set.
    pairs = [] if "train" in splits else [(images.get(s), p) for s, p in sorted(masks.items())]
    return DenseLayout("voc", root, splits=splits if "train" in splits else {}, pairs=pairs, classes=classes,
                       ignore=255, where="Pascal VOC masks in SegmentationClass/")


def find_depth_layout(path: str) -> DenseLayout | None:
    """The depth layout at ``path`` (``images/`` + ``depth/``), or None."""
    if not os.path.isdir(path):
        return None
    root = dataset_root(path)
    dirs = subfolders(root)
    if "images" not in dirs or "depth" not in dirs:
        return None
    splits, pairs = _split_pairs(root, dirs, "images", "depth", (".png", ".npy"))
    if not _matches(pairs or splits.get("train", [])):
        return None
    return DenseLayout("depth folders", root, task="depth", splits=splits, pairs=pairs,
                       where="depth maps in depth/ beside images/")
