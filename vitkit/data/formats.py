"""Detecting a dataset's format from its path and opening it with that format's reader
(:mod:`.trees`, :mod:`.arrays`, :mod:`.webdataset`, :mod:`.shapes`).

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

import os

from ..errors import DataError, PathNotFoundError
from .arrays import build_cifar, build_idx, find_cifar, find_idx
from .paths import SUPPORTED, is_system_path
from .shapes import ShapesDataset
from .splits import check_split
from .trees import TAR_SUFFIXES, build_folder_tree, build_listing, build_tar_tree
from .webdataset import WebDatasetShards, expand_shards, is_webdataset_tar

__all__ = ["SUPPORTED", "build_dataset"]


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
    check_split(split, val_fraction)
    kw = dict(in_chans=in_chans, max_bad_fraction=max_bad_fraction)
    path = str(path)

    if path == "shapes" or path.startswith("shapes:"):
        n = _shapes_count(path)
        n_split = n if split == "train" else max(100, n // 5)
        return ShapesDataset(n=n_split, split=split, seed=seed, in_chans=in_chans)

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
            return build_listing(path, split, val_fraction, seed, num_classes, kw)
        if low.endswith(TAR_SUFFIXES):
            if is_webdataset_tar(path):
                return WebDatasetShards(
                    [path], split=split, val_fraction=val_fraction, seed=seed, num_classes=num_classes, **kw
                )
            return build_tar_tree(path, split, val_fraction, seed, num_classes, kw)
        raise DataError(f"{path!r} is a file of no supported type: expected {SUPPORTED}")

    cifar = find_cifar(path)
    if cifar is not None:
        return build_cifar(cifar, split, num_classes, kw)
    idx = find_idx(path)
    if idx is not None:
        return build_idx(idx, split, num_classes, kw)
    shards = sorted(
        os.path.join(path, f) for f in os.listdir(path)
        if f.lower().endswith(TAR_SUFFIXES) and not is_system_path(f)
    )
    if shards and is_webdataset_tar(shards[0]):
        by_split = [s for s in shards if os.path.basename(s).lower().startswith(split)]
        other = "val" if split == "train" else "train"
        has_named = any(os.path.basename(s).lower().startswith(other) for s in shards)
        if by_split and has_named:
            return WebDatasetShards(by_split, split=None, seed=seed, num_classes=num_classes, **kw)
        return WebDatasetShards(shards, split=split, val_fraction=val_fraction, seed=seed, num_classes=num_classes, **kw)
    return build_folder_tree(path, split, val_fraction, seed, num_classes, kw)


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
