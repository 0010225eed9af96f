"""The data stage of a run: each split built once, its broken files found and left out, and a
description of the split the run actually trains and validates on."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .formats import build_dataset
from .inspect import DatasetInfo, describe_datasets, with_counts
from .scan import ScanReport, scan_files


@dataclass
class DataStage:
    """What :func:`prepare_data` built: the ``train`` and ``val`` datasets (broken files left
    out), their :class:`DatasetInfo`, the scan's report (None when nothing was scanned) and how
    long the scan took."""

    train: object
    val: object
    info: DatasetInfo
    scan: ScanReport | None
    scan_s: float = 0.0

    @property
    def in_chans(self) -> int:
        return self.train.in_chans

    def scan_line(self) -> str | None:
        """The console line reporting the scan, or None when nothing was scanned."""
        if self.scan is None:
            return None
        found = f"{len(self.scan.bad)} broken, left out (listed in bad_files.txt)" if self.scan.bad else "none broken"
        return f"checked {self.scan.scanned} image files in {self.scan_s:.1f} s: {found}"


def prepare_data(path: str, *, val_fraction: float = 0.1, seed: int = 0, in_chans: int | None = None,
                 max_bad_fraction: float = 0.05) -> DataStage:
    """Open the dataset at ``path`` once: both splits, the broken-file scan and the description.

    ``in_chans`` None takes the channels the images have (1 when all are gray); the split is
    ``build_dataset``'s with ``val_fraction`` and ``seed``.

    Raises:
        PathNotFoundError, DataError: see ``build_dataset`` and ``scan_files``.
    """
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
    return DataStage(train, val, with_counts(info, train, val), scan, scan_s)
