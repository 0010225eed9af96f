"""Reading caption listings: ``.jsonl`` / ``.csv`` rows of an image path and its caption(s).

Image keys: ``image``, ``file``, ``path``, ``filename``, ``filepath``, ``image_path``, ``img``
(paths relative to the listing's folder); caption keys: ``caption`` / ``text`` (one string) or
``captions`` (a list; in a CSV cell a JSON list); an optional ``label`` / ``class`` on every row
names the image's class. Rows naming the same image are merged, so one-caption-per-row listings
(COCO style) and one-image-per-row listings (Flickr style) read alike.
"""

from __future__ import annotations

import csv
import json
import logging
import os

from ..errors import DataError
from .paths import is_system_path
from .task import CAPTION_LAYOUTS

log = logging.getLogger("vitkit.data")

_IMAGE_KEYS = ("image", "file", "path", "filename", "filepath", "image_path", "img")
_TEXT_KEYS = ("captions", "caption", "text")
_LABEL_KEYS = ("label", "class")


def _caption_list(value) -> list[str]:
    """A caption field as a list of non-empty strings (a CSV cell may hold a JSON list)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                return [text]
        else:
            return [text] if text else []
    if isinstance(value, (list, tuple)):
        return [c.strip() for c in value if isinstance(c, str) and c.strip()]
    return []


def _rows(path: str):
    """``(line number, dict)`` of every row of a .jsonl or .csv; None for a row that is not an object."""
    with open(path, encoding="utf-8", newline="") as f:
        if path.lower().endswith(".jsonl"):
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError:
                        row = None
                    yield lineno, row if isinstance(row, dict) else None
            return
        reader = csv.DictReader(f)
        for lineno, row in enumerate(reader, 2):
            if any((v or "").strip() for v in row.values() if isinstance(v, str)):
                yield lineno, {str(k).strip().lower(): v for k, v in row.items() if k is not None}


_PARSED: dict[tuple, tuple] = {}


def read_caption_listing(path: str, max_bad_fraction: float = 0.05):
    """``(files, captions, labels | None, classes | None, notes)`` of a caption listing, one entry per
    image (rows naming the same image merged in order). Rows without an image or a caption and
    images whose file is missing are left out and counted in ``notes``.

    Raises:
        DataError: no usable row, or more than ``max_bad_fraction`` of the rows left out.
    """
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size, max_bad_fraction)
    if key in _PARSED:
        return _PARSED[key]
    base = os.path.dirname(os.path.abspath(path))
    merged: dict[str, tuple[list[str], str | None]] = {}
    rows_of: dict[str, int] = {}
    problems: dict[str, list[str]] = {"unreadable rows": [], "rows without an image path": [],
                                      "rows without a caption": [], "missing image files": []}
    n_rows = 0
    for lineno, row in _rows(path):
        n_rows += 1
        if row is None:
            problems["unreadable rows"].append(f"line {lineno}")
            continue
        image = next((row[k].strip() for k in _IMAGE_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
        caps = [c for k in _TEXT_KEYS if k in row for c in _caption_list(row[k])]
        if image is None:
            problems["rows without an image path"].append(f"line {lineno}")
        elif not caps:
            problems["rows without a caption"].append(f"line {lineno} ({image})")
        elif not is_system_path(image):
            file = image if os.path.isabs(image) else os.path.join(base, image)
            label = next((str(row[k]).strip() for k in _LABEL_KEYS if row.get(k) not in (None, "")), None)
            merged.setdefault(file, ([], label))[0].extend(caps)
            rows_of[file] = rows_of.get(file, 0) + 1
    for file in [f for f in merged if not os.path.isfile(f)]:
        problems["missing image files"].append(file)
        del merged[file]
    # The fraction is of rows: a missing image counts as many rows as named it.
    n_bad = sum(len(v) for k, v in problems.items() if k != "missing image files")
    n_bad += sum(rows_of[f] for f in problems["missing image files"])
    lines = [f"{len(v)} {what} left out (e.g. {v[0]})" for what, v in problems.items() if v]
    if not merged:
        raise DataError(f"{path}: no usable rows; expected {CAPTION_LAYOUTS}" + (f" ({'; '.join(lines)})" if lines else ""))
    if n_bad / max(n_rows, 1) > max_bad_fraction:
        raise DataError(f"{path}: {n_bad} of {n_rows} rows cannot be used, more than data.max_bad_fraction="
                        f"{max_bad_fraction}: {'; '.join(lines)}. Fix the listing, or raise the threshold")
    for line in lines:
        log.warning(f"{path}: {line}")
    files = list(merged)
    names = [merged[f][1] for f in files]
    classes = labels = None
    if all(n is not None for n in names):
        classes = sorted(set(names), key=lambda n: (not n.lstrip("-").isdigit(), int(n) if n.lstrip("-").isdigit() else 0, n))
        labels = [classes.index(n) for n in names]
    if len(_PARSED) >= 4:
        _PARSED.pop(next(iter(_PARSED)))
    _PARSED[key] = (files, [merged[f][0] for f in files], labels, classes, lines)
    return _PARSED[key]
