"""Counting files that were skipped because they could not be decoded.

A bad file is replaced by another sample so batches keep their size, and the replacement is
reported in the sample (``"skipped"``, ``"bad_files"``). The counting happens in the process
that consumes batches, so it is correct with any number of DataLoader workers: no shared
memory, no per-worker counters to merge. Each file counts once, however often it is met
(every epoch, or as the stand-in search meets it again), and is logged once as one line.
Files are normally found before training (``vitkit.data.scan_files``); this counter catches
the rest, and streaming data that cannot be scanned up front.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TypeVar

from ..errors import ConfigError, DataError
from .images import BadImageError

log = logging.getLogger("vitkit.data")

# Mid-epoch, the fraction is judged only after this many files: bad files cluster (one
# class folder, one shard), so a small early sample overstates the rate. The end of an epoch
# always checks.
_MIN_SEEN = 500
# A run of this many unreadable files in a row means the source itself is broken.
_MAX_REPLACEMENTS = 100

T = TypeVar("T")


def first_readable(i: int, n: int, read: Callable[[int], T], what: str) -> tuple[T, list[str]]:
    """``(read(i), [])``, or when that raises :class:`~vitkit.data.images.BadImageError`, the first
    readable stand-in and the messages of the unreadable ones.

    Stand-ins are pseudo-random indices seeded by ``(i, attempt)``, not the neighbour: bad files
    cluster in sorted listings, and the choice must be the same in every process and run. ``what``
    names the items in the error raised after ``_MAX_REPLACEMENTS`` failures in a row (e.g.
    "files of the image dataset").
    """
    bad: list[str] = []
    idx = i
    for k in range(min(n, _MAX_REPLACEMENTS)):
        if k:
            idx = random.Random(f"{i}:{k}").randrange(n)
        try:
            return read(idx), bad
        except BadImageError as e:
            bad.append(str(e))
    raise DataError(
        f"{len(bad)} {what} in a row could not be read, replacing item {i}:\n  " + "\n  ".join(bad[:20])
        + "\nDelete or fix these files (`vitkit.data.scan_files` lists every broken file)"
    )


class SkipCounter:
    """Tally of files seen and files skipped; raises when too many are bad.

    Args:
        max_bad_fraction: the largest tolerated ``skipped / seen``; above it :meth:`check`
            raises a DataError naming the first bad files.
    """

    def __init__(self, max_bad_fraction: float = 0.05):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        self.seen = 0
        self.skipped = 0
        self.bad_files: list[str] = []
        self._warned: set[str] = set()

    def add(self, n_good: int, bad_files: list[str]) -> None:
        """Record ``n_good`` decoded samples and the names of files that failed to decode."""
        new = [name for name in dict.fromkeys(bad_files) if name not in self._warned]
        self.seen += n_good + len(new)
        self.skipped += len(new)
        for name in new:
            self._warned.add(name)
            self.bad_files.append(name)
            log.warning(f"skipping broken file {name}")
        self.check(final=False)

    def check(self, final: bool = True) -> None:
        """Raise if the bad fraction is too high (before ``final``, only once enough files were seen)."""
        if self.skipped == 0 or (not final and self.seen < _MIN_SEEN):
            return
        if self.skipped / self.seen > self.max_bad_fraction:
            names = "\n  ".join(self.bad_files[:5])
            raise DataError(
                f"{self.skipped} of {self.seen} files could not be read "
                f"(more than data.max_bad_fraction={self.max_bad_fraction}); the dataset looks broken. "
                f"First bad files:\n  {names}\nDelete or fix them, or raise data.max_bad_fraction."
            )

    def summary(self) -> dict:
        """``{"seen", "skipped", "bad_files"}`` for the run summary."""
        return {"seen": self.seen, "skipped": self.skipped, "bad_files": list(self.bad_files)}


def leave_out(ds, names):
    """Drop from ``ds.indices`` the items whose ``ds.source.name(j)`` is in ``names`` (broken files) and
    add those names to ``ds.bad_files``; returns ``ds``. Shared by the datasets that index a source."""
    names = set(names)
    bad = [j for j in ds.indices if ds.source.name(j) in names]
    ds.bad_files = sorted(ds.bad_files + [ds.source.name(j) for j in bad])
    ds.indices = [j for j in ds.indices if ds.source.name(j) not in names]
    return ds
