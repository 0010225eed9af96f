"""Detecting a dataset's format from its path and reading it into an :class:`ImageDataset`.

Supported (``build_dataset`` picks by looking at the path):

- ``"shapes"`` / ``"shapes:N"``: the built-in procedural dataset (N training images);
- a class-per-folder tree, ``root/train/<class>/*`` + ``root/val|validation|valid|test/<class>/*``,
  or ``root/<class>/*`` split by a seeded stratified fraction;
- the same tree inside a ``.tar`` / ``.tar.gz`` / ``.tgz``, read without extracting;
- CIFAR-10 / CIFAR-100 python batches (``cifar-10-batches-py/``, ``cifar-100-python/``);
- MNIST / Fashion-MNIST IDX files (``train-images-idx3-ubyte[.gz]`` ...);
- a ``.csv`` or ``.jsonl`` of ``path,label`` (paths relative to the file);
- WebDataset shards (``.tar`` of ``key.jpg`` + ``key.cls``, a brace pattern, or a folder of them).
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import os
import pickle
import re
import struct
import tarfile
import zlib

import numpy as np

from ..errors import ConfigError, DataError, PathNotFoundError
from .dataset import ArraySource, FileSource, ImageDataset, TarSource, corrupt_archive
from .images import IMAGE_EXTENSIONS
from .scan import is_system_path

SUPPORTED = (
    "'shapes[:N]', a class-folder tree (root/train/<class>/..., root/val/<class>/... or root/<class>/...), "
    "a .tar/.tar.gz/.tgz of such a tree, CIFAR-10/100 python batches, MNIST/Fashion-MNIST IDX files, "
    "a .csv or .jsonl of path,label, or WebDataset shards (.tar with key.jpg + key.cls, 'shards-{000..009}.tar', "
    "or a folder of shards)"
)
_VAL_DIRS = ("val", "validation", "valid", "test")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def build_dataset(
    path: str,
    split: str = "train",
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    in_chans: int = 3,
    num_classes: int | None = None,
    max_bad_fraction: float = 0.05,
):
    """Open the dataset at ``path`` and return its ``split`` ("train" or "val").

    Returns an :class:`ImageDataset` (or :class:`WebDatasetShards` for shards, which stream).
    Datasets without their own split are split by a stratified fraction ``val_fraction``
    drawn with ``seed``: the same seed gives the same split every time.

    System files (``._x``, ``__MACOSX/``, ``.DS_Store``, hidden names ...) are never read as
    data, and files without an image extension in a class tree are ignored.

    Raises:
        PathNotFoundError: nothing exists at ``path``.
        DataError: ``path`` exists but is in no supported format, is empty or corrupt.
    """
    if split not in ("train", "val"):
        raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    kw = dict(in_chans=in_chans, max_bad_fraction=max_bad_fraction)
    path = str(path)

    if path == "shapes" or path.startswith("shapes:"):
        from .shapes import ShapesDataset

        n = _shapes_count(path)
        n_split = n if split == "train" else max(100, n // 5)
        return ShapesDataset(n=n_split, split=split, seed=seed, in_chans=in_chans)

    from .webdataset import WebDatasetShards, expand_shards, is_webdataset_tar

    if "{" in path and ".." in path:
        return WebDatasetShards(
            expand_shards(path), split=split, val_fraction=val_fraction, seed=seed, num_classes=num_classes, **kw
        )
    if not os.path.exists(path):
        raise PathNotFoundError(
            f"no such file or folder: {path!r}; check the path (expected a dataset folder, archive, listing "
            "or 'shapes')"
        )

    if os.path.isfile(path):
        low = path.lower()
        if low.endswith(".csv") or low.endswith(".jsonl"):
            return _build_listing(path, split, val_fraction, seed, num_classes, kw)
        if low.endswith(_TAR_SUFFIXES):
            if is_webdataset_tar(path):
                return WebDatasetShards(
                    [path], split=split, val_fraction=val_fraction, seed=seed, num_classes=num_classes, **kw
                )
            return _build_tar_tree(path, split, val_fraction, seed, num_classes, kw)
        raise DataError(f"{path!r} is a file of no supported type: expected {SUPPORTED}")

    cifar = _find_cifar(path)
    if cifar is not None:
        return _build_cifar(cifar, split, num_classes, kw)
    idx = _find_idx(path)
    if idx is not None:
        return _build_idx(idx, split, num_classes, kw)
    shards = sorted(
        os.path.join(path, f) for f in os.listdir(path)
        if f.lower().endswith(_TAR_SUFFIXES) and not is_system_path(f)
    )
    if shards and is_webdataset_tar(shards[0]):
        by_split = [s for s in shards if os.path.basename(s).lower().startswith(split)]
        other = "val" if split == "train" else "train"
        has_named = any(os.path.basename(s).lower().startswith(other) for s in shards)
        if by_split and has_named:
            return WebDatasetShards(by_split, split=None, seed=seed, num_classes=num_classes, **kw)
        return WebDatasetShards(shards, split=split, val_fraction=val_fraction, seed=seed, num_classes=num_classes, **kw)
    return _build_folder_tree(path, split, val_fraction, seed, num_classes, kw)


def _shapes_count(path: str) -> int:
    if path == "shapes":
        return 10000
    try:
        n = int(path.split(":", 1)[1])
    except ValueError:
        n = 0
    if n <= 0:
        raise DataError(f"{path!r}: expected 'shapes' or 'shapes:N' with N a positive number of training images")
    return n


# ---- class trees (folders and tars) ------------------------------------------------------------


def _tree_layout(relpaths: list[str], where: str) -> dict[str | None, list[tuple[int, str]]]:
    """Group image paths (relative, '/'-separated) by split and class.

    Returns ``{split_name_or_None: [(position_in_relpaths, class_name)]}``; a single tree
    without split folders has the key None. A common leading folder (``cifar10/``) is skipped.
    """
    parts = [p.strip("/").split("/") for p in relpaths]
    split_names = {"train", *_VAL_DIRS}
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
        return ImageDataset(source, targets_all, _classes(classes, num_classes), indices=indices, format=fmt, **kw)
    if split == "train":
        items = layout["train"]
    else:
        name = next((v for v in _VAL_DIRS if v in layout), None)
        if name is None:
            raise DataError(f"{source_name(source)}: has a train/ folder but no {'/'.join(_VAL_DIRS)} folder")
        items = layout[name]
    classes = sorted({c for _, c in layout["train"]})
    unknown = sorted({c for _, c in items} - set(classes))
    if unknown:
        raise DataError(f"{source_name(source)}: validation classes {unknown} do not appear in train/")
    source = _reorder(source, [k for k, _ in items])
    targets = [classes.index(c) for _, c in items]
    return ImageDataset(source, targets, _classes(classes, num_classes), format=fmt, **kw)


def source_name(source) -> str:
    return getattr(source, "path", None) or (source.name(0) if len(source) else "dataset")


def _reorder(source, order: list[int]):
    """Restrict a File/TarSource to the items ``order`` (positions in its listing)."""
    if isinstance(source, FileSource):
        return FileSource([source.paths[k] for k in order])
    return source.subset(order)


def _classes(names: list[str], num_classes: int | None) -> list[str]:
    if num_classes is None or num_classes == len(names):
        return list(names)
    if num_classes < len(names):
        raise ConfigError(f"data.num_classes={num_classes} but the dataset has {len(names)} classes")
    return list(names) + [f"class_{k}" for k in range(len(names), num_classes)]


def _build_folder_tree(path, split, val_fraction, seed, num_classes, kw) -> ImageDataset:
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


def _build_tar_tree(path, split, val_fraction, seed, num_classes, kw) -> ImageDataset:
    source = _read_tar(os.path.abspath(path), os.path.getmtime(path))
    layout = _tree_layout(source.names, path)
    return _tree_dataset(source, layout, split, val_fraction, seed, num_classes, kw, "tar")


def stratified_split(targets: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split positions into (train, val), taking ``round(val_fraction * count)`` of each class for val.

    Every class with at least 2 items gets at least one val item. Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    targets_np = np.asarray(targets)
    val: list[int] = []
    for c in np.unique(targets_np):
        members = np.flatnonzero(targets_np == c)
        k = int(round(val_fraction * len(members)))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        val.extend(rng.permutation(members)[:k].tolist())
    val_set = set(val)
    return [i for i in range(len(targets)) if i not in val_set], sorted(val)


# ---- CIFAR --------------------------------------------------------------------------------------


def _find_cifar(path: str) -> str | None:
    for cand in (path, os.path.join(path, "cifar-10-batches-py"), os.path.join(path, "cifar-100-python")):
        named_100 = os.path.basename(os.path.normpath(cand)) == "cifar-100-python"
        if os.path.isfile(os.path.join(cand, "data_batch_1")) or (
            os.path.isfile(os.path.join(cand, "train"))
            and (named_100 or os.path.isfile(os.path.join(cand, "meta")))
        ):
            return cand
    return None


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; any other global is refused before it runs.

    CIFAR ships only as pickled batches, so a dataset folder is the one place vitkit reads a
    pickle. A pickle can name any callable to run at load time; the batches need only numpy's
    array reconstruction, so every other name is refused.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            out = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataError(
            f"{path}: not a CIFAR python batch ({type(e).__name__}: {e}). CIFAR batches hold only numpy "
            "arrays, lists, bytes and numbers; a file that names other Python objects is refused unread. "
            "Download the dataset again from its source"
        ) from None
    if not isinstance(out, dict):
        raise DataError(f"{path}: not a CIFAR python batch (a {type(out).__name__}, expected a dict)")
    return out


def _build_cifar(root: str, split: str, num_classes, kw) -> ImageDataset:
    if os.path.isfile(os.path.join(root, "data_batch_1")):
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        files = [f for f in files if os.path.isfile(os.path.join(root, f))]
        label_key, meta_file, names_key, fmt = b"labels", "batches.meta", b"label_names", "cifar10"
    else:
        files = ["train" if split == "train" else "test"]
        label_key, meta_file, names_key, fmt = b"fine_labels", "meta", b"fine_label_names", "cifar100"
    data, labels = [], []
    for f in files:
        d = _unpickle(os.path.join(root, f))
        data.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(int(v) for v in d[label_key])
    array = np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1))
    meta_path = os.path.join(root, meta_file)
    if os.path.isfile(meta_path):
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(meta_path)[names_key]]
    else:
        names = [str(k) for k in range(max(labels) + 1)]
    source = ArraySource(array, os.path.join(root, "+".join(files)))
    return ImageDataset(source, labels, _classes(names, num_classes), format=fmt, **kw)


# ---- IDX (MNIST) --------------------------------------------------------------------------------


def _find_idx(path: str) -> dict[str, str] | None:
    found: dict[str, str] = {}
    for dirpath, _, filenames in os.walk(path):
        if dirpath[len(path):].count(os.sep) > 3:
            continue
        for f in filenames:
            m = re.fullmatch(r"(train|t10k)-(images-idx3|labels-idx1)-ubyte(\.gz)?", f)
            if m:
                found.setdefault(f"{m.group(1)}-{m.group(2)[:6]}", os.path.join(dirpath, f))
    return found if "train-images" in found and "train-labels" in found else None


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a uint8 array of its declared shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape} but holds {body.size} bytes; the file is truncated")
    return body.reshape(shape)


def _build_idx(files: dict[str, str], split: str, num_classes, kw) -> ImageDataset:
    prefix = "train" if split == "train" else "t10k"
    if f"{prefix}-images" not in files or f"{prefix}-labels" not in files:
        raise DataError(f"IDX dataset has no {prefix}-images/{prefix}-labels files for split {split!r}")
    images = read_idx(files[f"{prefix}-images"])
    labels = read_idx(files[f"{prefix}-labels"]).astype(np.int64).tolist()
    if len(images) != len(labels):
        raise DataError(f"IDX dataset: {len(images)} images but {len(labels)} labels")
    fashion = "fashion" in files[f"{prefix}-images"].lower()
    names = _FASHION_CLASSES if fashion else [str(k) for k in range(max(max(labels) + 1, 10))]
    source = ArraySource(np.ascontiguousarray(images), files[f"{prefix}-images"])
    return ImageDataset(
        source, labels, _classes(names, num_classes), format="fashion-mnist" if fashion else "idx", **kw
    )


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


def _build_listing(path, split, val_fraction, seed, num_classes, kw) -> ImageDataset:
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
        FileSource(paths), targets, _classes(classes, num_classes),
        indices=train_idx if split == "train" else val_idx, format=fmt, **kw,
    )
