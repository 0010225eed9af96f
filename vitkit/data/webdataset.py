"""WebDataset shards: tar files of ``key.jpg|png|webp`` + ``key.cls`` members, streamed.

Shards are read sequentially (``tarfile`` stream mode, so ``.tar.gz`` shards work too) and
split across DDP ranks and DataLoader workers **by shard**: worker ``g`` of ``G`` (over all
ranks) reads shards ``g, g + G, ...``. With fewer shards than workers every worker reads all
shards and keeps every ``G``-th sample instead, so no sample is lost or duplicated either way.
Ranks can receive different sample counts when shards differ in size; give each rank the
same number of equally sized shards for DDP.
"""

from __future__ import annotations

import os
import re
import tarfile
import zlib

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError, PathNotFoundError
from .dataset import corrupt_archive
from .images import BadImageError, decode_image
from .skips import SkipCounter

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
_SHUFFLE_BUFFER = 256


def expand_shards(pattern: str) -> list[str]:
    """Expand a brace pattern ``"shards-{000..009}.tar"`` (zero padding kept) into existing paths."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m is None:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    out = []
    for k in range(int(lo), int(hi) + 1):
        out.extend(expand_shards(pattern[: m.start()] + str(k).zfill(width) + pattern[m.end() :]))
    missing = [p for p in out if not os.path.exists(p)]
    if missing:
        raise PathNotFoundError(f"{len(missing)} shard(s) of {pattern!r} do not exist, e.g. {missing[0]!r}")
    return out


def _split_key(name: str) -> tuple[str, str]:
    """``"dir/000123.cls"`` → ``("dir/000123", "cls")``: the key ends at the basename's first dot."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def is_webdataset_tar(path: str, probe: int = 20) -> bool:
    """True if the first members of the tar look like WebDataset samples (a ``.cls`` member among them)."""
    try:
        with tarfile.open(path, "r|*") as tf:
            for k, m in enumerate(tf):
                if m.isfile() and _split_key(m.name)[1] == "cls":
                    return True
                if k >= probe:
                    break
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise corrupt_archive(path, e) from None
    return False


def _iter_tar_samples(path: str):
    """Yield ``(key, image_bytes | None, cls_text | None)`` for consecutive members sharing a key."""
    key, img, cls = None, None, None
    with tarfile.open(path, "r|*") as tf:
        for m in tf:
            if not m.isfile():
                continue
            k, ext = _split_key(m.name)
            if k != key:
                if key is not None:
                    yield key, img, cls
                key, img, cls = k, None, None
            if ext in _IMAGE_EXTS:
                img = tf.extractfile(m).read()
            elif ext == "cls":
                cls = tf.extractfile(m).read().decode().strip()
    if key is not None:
        yield key, img, cls


def _in_val(key: str, val_fraction: float, seed: int) -> bool:
    return zlib.crc32(f"{seed}:{key}".encode()) / 2**32 < val_fraction


class WebDatasetShards(IterableDataset):
    """Stream ``(PIL image, label)`` from WebDataset shards.

    Args:
        shards: tar paths.
        split: "train" or "val" to split the samples by a seeded hash of their key
            (``val_fraction`` of them go to val); None to use every sample (shards already split).
        shuffle: shuffle shard order and, within a buffer of 256, samples, seeded by ``(seed, epoch)``.
        num_classes: the class count; read from the ``.cls`` members when None (one pass).
    """

    def __init__(
        self,
        shards: list[str],
        *,
        split: str | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        in_chans: int = 3,
        num_classes: int | None = None,
        shuffle: bool | None = None,
        max_bad_fraction: float = 0.05,
    ):
        if not shards:
            raise DataError("WebDatasetShards needs at least one shard")
        self.shards = list(shards)
        self.split = split
        self.val_fraction = val_fraction
        self.seed = seed
        self.in_chans = in_chans
        self.shuffle = (split != "val") if shuffle is None else shuffle
        self.epoch = 0
        self.format = "webdataset"
        self.skips = SkipCounter(max_bad_fraction)
        self._targets: list[int] | None = None
        self.num_classes = num_classes if num_classes is not None else max(self.targets, default=-1) + 1
        self.classes = [str(k) for k in range(self.num_classes)]

    def _keep(self, key: str) -> bool:
        if self.split is None:
            return True
        return _in_val(key, self.val_fraction, self.seed) == (self.split == "val")

    @property
    def targets(self) -> list[int]:
        """Labels of all samples in shard order (one pass over the shards, then cached)."""
        if self._targets is None:
            self._targets = [
                int(cls) for s in self.shards for key, _, cls in _iter_tar_samples(s) if cls is not None and self._keep(key)
            ]
        return self._targets

    def __len__(self) -> int:
        return len(self.targets)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _assignment(self) -> tuple[list[str], int, int]:
        """(shards to read, sample stride, sample offset) for this rank and worker."""
        world, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        info = get_worker_info()
        nw, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        total, gid = world * nw, rank * nw + wid
        shards = list(self.shards)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))
            shards = [shards[k] for k in order]
        if len(shards) >= total:
            return shards[gid::total], 1, 0
        return shards, total, gid

    def samples(self):
        """Yield ``(key, image, label, bad_files)``; unreadable images are skipped and reported with the next sample."""
        shards, stride, offset = self._assignment()
        bad: list[str] = []
        counter = -1

        def stream():
            nonlocal counter, bad
            for shard in shards:
                for key, data, cls in _iter_tar_samples(shard):
                    if cls is None or data is None or not self._keep(key):
                        continue
                    counter += 1
                    if counter % stride != offset:
                        continue
                    try:
                        img = decode_image(data, self.in_chans, name=f"{shard}:{key}")
                    except BadImageError as e:
                        bad.append(str(e))
                        continue
                    yield key, img, int(cls), bad
                    bad = []

        if not self.shuffle:
            yield from stream()
            return
        info = get_worker_info()
        rng = np.random.default_rng([self.seed, self.epoch, offset, 0 if info is None else info.id])
        buffer = []
        for item in stream():
            buffer.append(item)
            if len(buffer) >= _SHUFFLE_BUFFER:
                yield buffer.pop(int(rng.integers(len(buffer))))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        for _, img, label, bad in self.samples():
            self.skips.add(1, bad)
            yield img, label
