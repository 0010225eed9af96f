"""Datasets listed by path: class-per-folder trees (a folder, or a tar read without extracting)
and ``.csv`` / ``.jsonl`` listings of ``path,label``."""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import tarfile
import zlib

from ..errors import DataError
from .dataset import FileSource, ImageDataset, TarSource, corrupt_archive
from .images import IMAGE_EXTENSIONS
from .paths import SUPPORTED, is_system_path
from .splits import class_names, stratified_split

VAL_DIRS = ("val", "validation", "valid", "test")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


# ---- class trees (folders and tars) ------------------------------------------------------------


def _tree_layout(relpaths: list[str], where: str) -> dict[str | None, list[tuple[int, str]]]:
    """Group image paths (relative, '/'-separated) by split and class.

    Returns ``{split_name_or_None: [(position_in_relpaths, class_name)]}``; a single tree
    without split folders has the key None. A common leading folder (``cifar10/``) is skipped.
    """
    parts = [p.strip("/").split("/") for p in relpaths]
    split_names = {"train", *VAL_DIRS}
    while (
        parts
        and all(len(p) > 2 for p in parts)
        and len({p[0] for p in parts}) == 1
        and parts[0][0].lower() not in split_names
    ):
        parts = [p[1:] for p in parts]
    if not parts:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {where}: expected {SUPPORTED}")
    tops = {p[0].lower() for p in parts if len(p) >= 3}
    layout: dict[str | None, list[tuple[int, str]]] = {}
    if "train" in tops and tops <= split_names:
        for k, p in enumerate(parts):
            if len(p) >= 3 and p[0].lower() in split_names:
                layout.setdefault(p[0].lower(), []).append((k, p[1]))
        return layout
    for k, p in enumerate(parts):
        if len(p) < 2:
            raise DataError(
                f"{where}: image {relpaths[k]!r} is not inside a class folder; expected root/<class>/image "
                f"or root/train/<class>/image"
            )
        layout.setdefault(None, []).append((k, p[0]))
    return layout


def _tree_dataset(source, layout, split, val_fraction, seed, num_classes, kw, fmt: str) -> ImageDataset:
    if None in layout:
        items = layout[None]
        classes = sorted({c for _, c in items})
        order = [k for k, _ in items]
        targets_all = [classes.index(c) for _, c in items]
        source = _reorder(source, order)
        train_idx, val_idx = stratified_split(targets_all, val_fraction, seed)
        indices = train_idx if split == "train" else val_idx
        return ImageDataset(source, targets_all, class_names(classes, num_classes), indices=indices, format=fmt, **kw)
    if split == "train":
        items = layout["train"]
    else:
        name = next((v for v in VAL_DIRS if v in layout), None)
        if name is None:
            raise DataError(f"{source_name(source)}: has a train/ folder but no {'/'.join(VAL_DIRS)} folder")
        items = layout[name]
    classes = sorted({c for _, c in layout["train"]})
    unknown = sorted({c for _, c in items} - set(classes))
    if unknown:
        raise DataError(f"{source_name(source)}: validation classes {unknown} do not appear in train/")
    source = _reorder(source, [k for k, _ in items])
    targets = [classes.index(c) for _, c in items]
    return ImageDataset(source, targets, class_names(classes, num_classes), format=fmt, **kw)


def source_name(source) -> str:
    return getattr(source, "path", None) or (source.name(0) if len(source) else "dataset")


def _reorder(source, order: list[int]):
    """Restrict a File/TarSource to the items ``order`` (positions in its listing)."""
    if isinstance(source, FileSource):
        return FileSource([source.paths[k] for k in order])
    return source.subset(order)


def build_folder_tree(path, split, val_fraction, seed, num_classes, kw) -> ImageDataset:
    rel = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not is_system_path(d))
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTENSIONS) and not is_system_path(f):
                rel.append(os.path.relpath(os.path.join(dirpath, f), path).replace(os.sep, "/"))
    layout = _tree_layout(rel, path)
    source = FileSource([os.path.join(path, r) for r in rel])
    return _tree_dataset(source, layout, split, val_fraction, seed, num_classes, kw, "folder")


@functools.lru_cache(maxsize=4)
def _read_tar(path: str, mtime: float) -> TarSource:
    """Index (``.tar``) or load (``.tar.gz``) a tar once per process; train and val share it."""
    compressed = not path.lower().endswith(".tar")
    members, data = [], [] if compressed else None
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS) and not is_system_path(m.name):
                    members.append(m)
                    if compressed:
                        data.append(tf.extractfile(m).read())
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise corrupt_archive(path, e) from None
    return TarSource(path, members, data)


def build_tar_tree(path, split, val_fraction, seed, num_classes, kw) -> ImageDataset:
    source = _read_tar(os.path.abspath(path), os.path.getmtime(path))
    layout = _tree_layout(source.names, path)
    return _tree_dataset(source, layout, split, val_fraction, seed, num_classes, kw, "tar")


# ---- CSV / JSONL listings -----------------------------------------------------------------------

_PATH_KEYS = ("path", "file", "filename", "image", "img")
_LABEL_KEYS = ("label", "class", "target", "y")


def _read_listing(path: str) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if path.lower().endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                p = next((rec[k] for k in _PATH_KEYS if k in rec), None)
                y = next((rec[k] for k in _LABEL_KEYS if k in rec), None)
                if p is None or y is None:
                    raise DataError(f"{path}:{lineno}: expected keys {_PATH_KEYS[0]!r} and {_LABEL_KEYS[0]!r}, got {list(rec)}")
                rows.append((str(p), str(y)))
        return rows
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if lineno == 1 and row[0].strip().lower() in _PATH_KEYS:
                continue  # header
            if len(row) < 2:
                raise DataError(f"{path}:{lineno}: expected 'path,label', got {row}")
            rows.append((row[0].strip(), row[1].strip()))
    return rows


def build_listing(path, split, val_fraction, seed, num_classes, kw) -> ImageDataset:
    rows = [r for r in _read_listing(path) if not is_system_path(r[0])]
    if not rows:
        raise DataError(f"{path}: no rows; expected lines of 'path,label'")
    base = os.path.dirname(os.path.abspath(path))
    paths = [p if os.path.isabs(p) else os.path.join(base, p) for p, _ in rows]
    labels = [y for _, y in rows]
    if all(re.fullmatch(r"-?\d+", y) for y in labels):
        targets = [int(y) for y in labels]
        if min(targets) < 0:
            raise DataError(f"{path}: negative label {min(targets)}")
        classes = [str(k) for k in range(max(targets) + 1)]
    else:
        classes = sorted(set(labels))
        targets = [classes.index(y) for y in labels]
    train_idx, val_idx = stratified_split(targets, val_fraction, seed)
    fmt = "jsonl" if path.lower().endswith(".jsonl") else "csv"
    return ImageDataset(
        FileSource(paths), targets, class_names(classes, num_classes),
        indices=train_idx if split == "train" else val_idx, format=fmt, **kw,
    )
