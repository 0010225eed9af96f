"""Datasets that ship as arrays: CIFAR-10/100 python batches and MNIST / Fashion-MNIST IDX files."""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct

import numpy as np

from ..errors import DataError
from .dataset import ArraySource, ImageDataset
from .splits import class_names

_FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


# ---- CIFAR --------------------------------------------------------------------------------------


def find_cifar(path: str) -> str | None:
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


def build_cifar(root: str, split: str, num_classes, kw) -> ImageDataset:
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
    return ImageDataset(source, labels, class_names(names, num_classes), format=fmt, **kw)


# ---- IDX (MNIST) --------------------------------------------------------------------------------


def find_idx(path: str) -> dict[str, str] | None:
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


def build_idx(files: dict[str, str], split: str, num_classes, kw) -> ImageDataset:
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
        source, labels, class_names(names, num_classes), format="fashion-mnist" if fashion else "idx", **kw
    )
