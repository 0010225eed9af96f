"""Finding broken image files before training.

Training should never meet a broken file: :func:`scan_files` decodes every image of a dataset
once, in parallel threads (Pillow releases the GIL while decoding), judges the bad fraction on
the whole dataset, and returns the broken names so the datasets can leave them out. Above
:data:`MAX_SCAN_FILES` files, and for streaming formats, files are counted as they are read
instead (:class:`~vitkit.data.skips.SkipCounter`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import DataError
from .images import BadImageError

# Decoding 100k small images takes a minute or two on a few cores; above that the scan would
# delay the first step too long, so files are counted as training reads them.
MAX_SCAN_FILES = 100_000


@dataclass
class ScanReport:
    """What :func:`scan_files` found: ``bad`` maps each broken file's name to the reason."""

    scanned: int = 0
    bad: dict[str, str] = field(default_factory=dict)

    @property
    def bad_files(self) -> list[str]:
        return sorted(self.bad)

    def lines(self) -> list[str]:
        """One ``name: reason`` line per broken file, for ``bad_files.txt``."""
        return [self.bad[name] for name in self.bad_files]


def _check(source, j: int) -> tuple[str, str | None]:
    try:
        source.image(j, 3)
    except BadImageError as e:
        return source.name(j), str(e)
    return source.name(j), None


def scan_files(datasets, *, max_bad_fraction: float = 1.0, workers: int | None = None,
               max_files: int = MAX_SCAN_FILES) -> ScanReport | None:
    """Decode every image of ``datasets`` (e.g. the train and val split) once; return the broken ones.

    Dense datasets are checked by pairs (image with its mask or depth map: both readable, the
    same size, mask values within the classes); their message counts pairs.

    Each file is counted once even if several datasets share it. Datasets without a file
    source (arrays, built-in or streaming data) need no scan and are passed over. Returns None
    when there are more than ``max_files`` files (they are counted during training instead).

    Raises:
        DataError: more than ``max_bad_fraction`` of the files are broken, or all of them.
    """
    items: dict[str, tuple] = {}
    what = "image files"
    for ds in datasets:
        source = getattr(ds, "source", None)
        if source is None or not getattr(source, "scannable", False):
            continue
        what = getattr(source, "what", what)
        for j in ds.indices:
            items.setdefault(source.name(j), (source, j))
    if not items or len(items) > max_files:
        return None
    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda it: _check(*it), items.values(), chunksize=64))
    report = ScanReport(scanned=len(items), bad={name: why for name, why in results if why is not None})
    n_bad = len(report.bad)
    shown = "\n  ".join(report.lines()[:5]) + (f"\n  ... and {n_bad - 5} more" if n_bad > 5 else "")
    if n_bad and n_bad == report.scanned:
        raise DataError(
            f"none of the {n_bad} {what} can be read:\n  {shown}\nCheck that the path holds the images "
            "you meant (re-copy or re-download them)"
        )
    if n_bad / report.scanned > max_bad_fraction:
        raise DataError(
            f"{n_bad} of {report.scanned} {what} ({n_bad / report.scanned:.1%}) cannot be read, more than "
            f"data.max_bad_fraction={max_bad_fraction}:\n  {shown}\n"
            "Delete or fix these files, or raise the threshold (e.g. data.max_bad_fraction=0.2) to train "
            "without them."
        )
    return report
