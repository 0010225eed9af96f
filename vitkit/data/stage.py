"""The data stage of a run: each split built once, its broken files found and left out, and a
description of the split the run actually trains and validates on."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import ConfigError
from .captions import build_caption_dataset, describe_captions
from .dense import build_dense_dataset
from .detection import build_detection_dataset, describe_detection
from .formats import build_dataset
from .inspect import DatasetInfo, describe_datasets, describe_dense, with_counts
from .scan import ScanReport, scan_files
from .task import detect_task


@dataclass
class DataStage:
    """What :func:`prepare_data` built: the ``train`` and ``val`` datasets (broken files left
    out), their :class:`DatasetInfo`, the scan's report (None when nothing was scanned), how
    long the scan took, the ``task`` they serve and the sentence saying why (``reason``)."""

    train: object
    val: object
    info: DatasetInfo
    scan: ScanReport | None
    scan_s: float = 0.0
    task: str = "classify"
    reason: str = ""

    @property
    def in_chans(self) -> int:
        return self.train.in_chans

    def scan_line(self) -> str | None:
        """The console line reporting the scan, or None when nothing was scanned."""
        if self.scan is None:
            return None
        found = f"{len(self.scan.bad)} broken, left out (listed in bad_files.txt)" if self.scan.bad else "none broken"
        what = "image files" if self.task in ("classify", "detect", "caption") else "image pairs"
        return f"checked {self.scan.scanned} {what} in {self.scan_s:.1f} s: {found}"


def prepare_data(path: str, *, val_fraction: float = 0.1, seed: int = 0, in_chans: int | None = None,
                 max_bad_fraction: float = 0.05, task: str | None = None,
                 ignore_index: int | None = None) -> DataStage:
    """Open the dataset at ``path`` once: both splits, the broken-file scan and the description.

    ``task`` None detects the task from the data (:func:`~vitkit.data.task.detect_task`).
    ``in_chans`` None takes the channels the images have (1 when all are gray); the split is
    ``build_dataset``'s (``build_dense_dataset``'s for segment/depth, with ``ignore_index``;
    ``build_detection_dataset``'s for detect) with ``val_fraction`` and ``seed``. Dense data is
    scanned by image/target pairs, detection data by images (each checked against the size its
    annotations give); ``info`` of detection data is a :class:`~vitkit.data.detection.DetectionInfo`
    (box counts, boxes per image, median box area). Caption data (``build_caption_dataset``) is
    scanned by image files; its ``info`` is a :class:`~vitkit.data.captions.CaptionInfo`
    (``captions_per_image``, ``caption_words``, caption counts, ``classes`` or None).

    Raises:
        PathNotFoundError, DataError: see ``build_dataset`` and ``scan_files``.
        ConfigError: see ``detect_task``; or a task whose data vitkit cannot read yet.
    """
    if task == "generate":  # generators learn from classification data: images and their classes
        task = "classify"
    if task == "promptable":  # instance masks have their own layouts (COCO masks, instance PNGs, scenes)
        from .instances import open_instances

        train, val, info, reason = open_instances(path, val_fraction=val_fraction, seed=seed, in_chans=in_chans)
        return DataStage(train, val, info, None, 0.0, "promptable", reason)
    choice = detect_task(path, task)
    if choice.task in ("segment", "depth"):
        return _prepare_dense(path, choice, val_fraction, seed, in_chans, max_bad_fraction, ignore_index)
    if choice.task == "detect":
        return _prepare_detect(path, choice, val_fraction, seed, in_chans, max_bad_fraction)
    if choice.task == "caption":
        return _prepare_caption(path, choice, val_fraction, seed, in_chans, max_bad_fraction)
    if choice.task != "classify":
        raise ConfigError(f"{path}: task {choice.task!r} ({choice.reason}) has no data reader in this version "
                          "of vitkit; pass --task classify|segment|depth|detect|caption|promptable")
    # Built with RGB decoding: the description judges gray from colour images; the channels the
    # run wants are set once they are known.
    train, val = (
        build_dataset(path, split, val_fraction=val_fraction, seed=seed, max_bad_fraction=max_bad_fraction)
        for split in ("train", "val")
    )
    t0 = time.perf_counter()
    scan = scan_files([train, val], max_bad_fraction=max_bad_fraction)
    scan_s = time.perf_counter() - t0
    info = describe_datasets(train, val, seed=seed, where=path)
    for ds in (train, val):
        ds.in_chans = in_chans or info.in_chans
        if scan is not None and scan.bad:
            ds.exclude(scan.bad_files)
    return DataStage(train, val, with_counts(info, train, val), scan, scan_s, choice.task, choice.reason)


def _prepare_dense(path, choice, val_fraction, seed, in_chans, max_bad_fraction, ignore_index) -> DataStage:
    def build(split):
        return build_dense_dataset(path, choice.task, split, val_fraction=val_fraction, seed=seed,
                                   ignore_index=ignore_index, max_bad_fraction=max_bad_fraction)
    return _prepare_split(path, choice, build, describe_dense, seed, in_chans, max_bad_fraction)


def _prepare_detect(path, choice, val_fraction, seed, in_chans, max_bad_fraction) -> DataStage:
    def build(split):
        return build_detection_dataset(path, split, val_fraction=val_fraction, seed=seed,
                                       max_bad_fraction=max_bad_fraction)
    return _prepare_split(path, choice, build, describe_detection, seed, in_chans, max_bad_fraction)


def _prepare_caption(path, choice, val_fraction, seed, in_chans, max_bad_fraction) -> DataStage:
    def build(split):
        return build_caption_dataset(path, split, val_fraction=val_fraction, seed=seed,
                                     max_bad_fraction=max_bad_fraction)
    return _prepare_split(path, choice, build, describe_captions, seed, in_chans, max_bad_fraction)


def _prepare_split(path, choice, build, describe, seed, in_chans, max_bad_fraction) -> DataStage:
    """Both splits of dense, detection or caption data: scanned (pairs, or images), broken items
    left out, then described."""
    train, val = build("train"), build("val")
    t0 = time.perf_counter()
    scan = scan_files([train, val], max_bad_fraction=max_bad_fraction)
    scan_s = time.perf_counter() - t0
    for ds in (train, val):
        if scan is not None and scan.bad:
            ds.exclude(scan.bad_files)
    info = describe(train, val, seed=seed, where=path)
    for ds in (train, val):
        ds.in_chans = in_chans or info.in_chans
    return DataStage(train, val, info, scan, scan_s, choice.task, choice.reason)
