"""ImageDataset: a labelled list of images read from a source (files, a tar, or arrays).

A *source* knows how to produce image ``j`` (``image(j, in_chans)``) and its name
(``name(j)``); :class:`ImageDataset` adds labels, the train/val subset, mode conversion and the
bad-file policy. Sources are safe in DataLoader worker processes: they hold paths, in-memory
bytes or arrays, and reopen file handles after a fork.
"""

from __future__ import annotations

import os
import tarfile
import threading

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .images import BadImageError, decode_image
from .skips import SkipCounter, first_readable


class FileSource:
    """Images stored as individual files on disk."""

    scannable = True  # worth a decode scan before training (see vitkit.data.scan)

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, j: int) -> str:
        return self.paths[j]

    def image(self, j: int, in_chans: int) -> Image.Image:
        path = self.paths[j]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BadImageError(f"{path}: {e}") from None
        return decode_image(data, in_chans, name=path)


class TarSource:
    """Images stored as members of a tar archive, read without extracting.

    An uncompressed ``.tar`` is indexed once (member offsets) and read with ``seek``; each
    process opens its own handle, so forked DataLoader workers never share a file position.
    A compressed ``.tar.gz`` cannot seek, so its image bytes are read into memory once at
    construction: one sequential pass is the fastest way through gzip, and datasets of CIFAR
    size (tens of MB) fit easily. Workers then share the bytes copy-on-write. Threads of one
    process (the up-front scan) share the handle under a lock.
    """

    scannable = True

    def __init__(self, path: str, members: list[tarfile.TarInfo], data: list[bytes] | None = None):
        self.path = path
        self.names = [m.name for m in members]
        self.offsets = [(m.offset_data, m.size) for m in members]
        self.data = data
        self._fh = None
        self._pid = -1
        self._lock = threading.Lock()

    def subset(self, order: list[int]) -> TarSource:
        """The same archive restricted to the members at positions ``order``."""
        out = TarSource(self.path, [])
        out.names = [self.names[k] for k in order]
        out.offsets = [self.offsets[k] for k in order]
        out.data = None if self.data is None else [self.data[k] for k in order]
        return out

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fh"], state["_pid"] = None, -1  # handles do not cross process boundaries
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def name(self, j: int) -> str:
        return f"{self.path}:{self.names[j]}"

    def image(self, j: int, in_chans: int) -> Image.Image:
        if self.data is not None:
            data = self.data[j]
        else:
            with self._lock:
                if self._fh is None or self._pid != os.getpid():
                    self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open for the process lifetime
                    self._pid = os.getpid()
                offset, size = self.offsets[j]
                self._fh.seek(offset)
                data = self._fh.read(size)
        return decode_image(data, in_chans, name=self.name(j))


class ArraySource:
    """Images held as a uint8 array (N, H, W) or (N, H, W, C), e.g. CIFAR or MNIST."""

    def __init__(self, array: np.ndarray, name: str):
        self.array = array
        self._name = name

    def __len__(self) -> int:
        return len(self.array)

    def name(self, j: int) -> str:
        return f"{self._name}[{j}]"

    def image(self, j: int, in_chans: int) -> Image.Image:
        a = self.array[j]
        img = Image.fromarray(a, "L" if a.ndim == 2 else "RGB")
        return img.convert("L" if in_chans == 1 else "RGB")


class ImageDataset(Dataset):
    """Labelled images; ``ds[i]`` is ``(PIL image in mode "L" or "RGB", int label)``.

    Args:
        source: where images come from (see the module notes).
        targets: the label of every source item.
        classes: class names, ``classes[label]``.
        in_chans: 1 (grayscale) or 3 (RGB); every image is converted on read.
        indices: the source items in this dataset (the train or val subset); all when None.
        format: the detected format name, for messages and :meth:`stats`.
        max_bad_fraction: tolerated fraction of unreadable files (see :class:`SkipCounter`).

    Broken files found before training (``vitkit.data.scan_files``) are left out with
    :meth:`exclude` and listed in ``bad_files``. A file that still fails to decode is replaced by
    another (seeded pseudo-random) item, so a batch keeps its size; :meth:`load` reports the
    replaced names so a loader can count them in the main process.
    """

    def __init__(
        self,
        source,
        targets: list[int],
        classes: list[str],
        *,
        in_chans: int = 3,
        indices: list[int] | None = None,
        format: str = "",
        max_bad_fraction: float = 0.05,
    ):
        if in_chans not in (1, 3):
            raise ConfigError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
        self.source = source
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self.targets = [int(targets[j]) for j in self.indices]
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.in_chans = in_chans
        self.format = format
        self.skips = SkipCounter(max_bad_fraction)
        self.bad_files: list[str] = []

    def exclude(self, names) -> ImageDataset:
        """Leave out the items whose source name is in ``names`` (broken files); they go to ``bad_files``."""
        names = set(names)
        is_bad = [self.source.name(j) in names for j in self.indices]
        self.bad_files = sorted(self.bad_files + [self.source.name(j) for j, b in zip(self.indices, is_bad) if b])
        self.indices = [j for j, b in zip(self.indices, is_bad) if not b]
        self.targets = [y for y, b in zip(self.targets, is_bad) if not b]
        return self

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> tuple[Image.Image, int, list[str]]:
        """Return ``(image, label, bad_files)``: item ``i`` or, if it is unreadable, a readable stand-in."""
        def read(idx: int):
            return self.source.image(self.indices[idx], self.in_chans), self.targets[idx]

        (img, label), bad = first_readable(i, len(self.indices), read, f"files of the {self.format or 'image'} dataset")
        return img, label, bad

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        img, label, bad = self.load(i)
        self.skips.add(1, bad)
        return img, label

    def stats(self, max_samples: int = 200, seed: int = 0) -> dict:
        """Median size over up to ``max_samples`` images: ``{typical_size: (H, W), in_chans, num_classes, n}``."""
        n = len(self)
        pick = np.random.default_rng(seed).permutation(n)[:max_samples] if n else []
        hs, ws = [], []
        for i in pick:
            try:
                img = self.source.image(self.indices[int(i)], self.in_chans)
            except BadImageError:
                continue
            ws.append(img.width)
            hs.append(img.height)
        size = (int(np.median(hs)), int(np.median(ws))) if hs else (0, 0)
        return {"typical_size": size, "in_chans": self.in_chans, "num_classes": self.num_classes, "n": n}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(format={self.format!r}, n={len(self)}, num_classes={self.num_classes}, "
            f"in_chans={self.in_chans})"
        )


def corrupt_archive(path: str, e: BaseException) -> DataError:
    reason = str(e) or type(e).__name__
    return DataError(
        f"cannot read the archive {path}: it is truncated or corrupt ({type(e).__name__}: {reason}). "
        "Copy or download it again, or extract it and pass the folder"
    )
