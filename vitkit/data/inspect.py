"""A quick look at a dataset, so the CLI can pick a model and resolution on its own."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import DataError
from .formats import build_dataset
from .images import BadImageError

# A colour JPEG of a gray picture keeps small chroma noise; within this many levels it is gray.
_GRAY_TOLERANCE = 3


@dataclass
class DatasetInfo:
    """What :func:`describe_datasets` found. ``typical_size`` is the median (H, W) of the sampled images;
    ``class_counts`` are training images per class (empty when the format does not list labels),
    or for segmentation pixels per class over the sampled masks. ``ignore_index`` is the mask
    value of void pixels (segmentation) and ``notes`` what the plan should say about the data."""

    num_classes: int
    in_chans: int
    typical_size: tuple[int, int]
    n_train: int
    n_val: int
    format: str
    classes: tuple[str, ...] = ()
    class_counts: tuple[int, ...] = ()
    task: str = "classify"
    ignore_index: int | None = None
    notes: tuple[str, ...] = ()


def _sampled_images(ds, max_samples: int, seed: int):
    if hasattr(ds, "samples"):  # streaming shards: the first images in order
        for k, (_, img, _, _) in enumerate(ds.samples()):
            if k >= max_samples:
                return
            yield img
        return
    n = len(ds)
    for i in np.random.default_rng(seed).permutation(n)[:max_samples]:
        try:
            yield ds.source.image(ds.indices[int(i)], 3)
        except BadImageError:
            continue


def describe_datasets(train, val, max_samples: int = 200, seed: int = 0, where: str = "the dataset") -> DatasetInfo:
    """Sample up to ``max_samples`` images of the built ``train`` split; report sizes, channels and
    the counts of ``train`` and ``val`` as they are (the split the run uses).

    ``in_chans`` is 1 when every sampled image is gray (R = G = B), else 3.
    """
    if getattr(train, "format", "") == "shapes":
        h = w = train.img_size
        gray = False
    else:
        hs, ws, gray = [], [], True
        for img in _sampled_images(train, max_samples, seed):
            hs.append(img.height)
            ws.append(img.width)
            if gray:
                a = np.asarray(img, dtype=np.int16)
                gray = bool(np.abs(a - a.mean(axis=2, keepdims=True)).max() <= _GRAY_TOLERANCE)
        if not hs:
            raise DataError(f"{where}: none of the sampled images could be read; check that the folder holds images "
                            "(vitkit.data.scan_files lists the broken ones)")
        h, w = int(np.median(hs)), int(np.median(ws))
    info = DatasetInfo(
        num_classes=train.num_classes, in_chans=1 if gray else 3, typical_size=(h, w), n_train=0, n_val=0,
        format=train.format, classes=tuple(getattr(train, "classes", ()) or ()),
    )
    return with_counts(info, train, val)


def with_counts(info: DatasetInfo, train, val) -> DatasetInfo:
    """``info`` with the image counts of ``train`` and ``val`` (after broken files are left out, say)."""
    targets = getattr(train, "targets", None)
    if targets is None and getattr(train, "task", "classify") != "classify":
        return replace(info, n_train=len(train), n_val=len(val))  # dense: pixel counts from describe_dense
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=train.num_classes) if targets else []
    return replace(info, n_train=len(train), n_val=len(val), class_counts=tuple(int(c) for c in counts))


def describe_dense(train, val, max_samples: int = 200, seed: int = 0, where: str = "the dataset") -> DatasetInfo:
    """:func:`describe_datasets` for segmentation and depth data: sizes and channels of up to
    ``max_samples`` sampled images and, for segmentation, pixels per class over their masks."""
    hs, ws, gray = [], [], True
    counts = np.zeros(max(train.num_classes, 1), dtype=np.int64)
    for i in np.random.default_rng(seed).permutation(len(train))[:max_samples]:
        img, target, _ = train.load(int(i))
        hs.append(img.height)
        ws.append(img.width)
        if gray and img.mode != "L":
            a = np.asarray(img, dtype=np.int16)
            gray = bool(np.abs(a - a.mean(axis=2, keepdims=True)).max() <= _GRAY_TOLERANCE)
        if "mask" in target:
            m = np.asarray(target["mask"], dtype=np.int64).ravel()
            counts += np.bincount(m[m < len(counts)], minlength=len(counts))[: len(counts)]
    if not hs:
        raise DataError(f"{where}: no image pairs to describe")
    segment = train.task == "segment"
    info = DatasetInfo(
        num_classes=train.num_classes, in_chans=1 if gray else 3, typical_size=(int(np.median(hs)), int(np.median(ws))),
        n_train=len(train), n_val=len(val), format=train.format, classes=tuple(train.classes),
        class_counts=tuple(int(c) for c in counts) if segment else (), task=train.task,
        ignore_index=int(train.ignore_index) if segment else None, notes=tuple(getattr(train, "notes", ())),
    )
    return info


def inspect_dataset(path: str, max_samples: int = 200, seed: int = 0, val_fraction: float = 0.1) -> DatasetInfo:
    """:func:`describe_datasets` of the dataset at ``path``, split as ``build_dataset`` splits it."""
    train, val = (build_dataset(path, s, val_fraction=val_fraction, seed=seed) for s in ("train", "val"))
    return describe_datasets(train, val, max_samples, seed, where=path)
