"""WebDataset shards: tar files of ``key.jpg|png|webp`` + ``key.cls`` members, streamed.

Image-text shards (``key.jpg`` + ``key.txt``, one caption per non-empty line of the ``.txt``) are
read the same way with ``captions=True``: each sample's target is then ``{"captions": [...],
"label": None, "image_id": int}`` instead of the class index.

Nothing is decoded up front: the first use builds an index from the tar headers and the tiny
``.cls`` members (an uncompressed ``.tar`` is skipped through by seeking; a ``.tar.gz`` must be
decompressed once). The index gives exact lengths, so the loader's ``len()`` equals what it
yields on every rank and in every worker:

- **Ranks** get a fixed set of whole shards, ``shards[rank::world]``; the shard count must be a
  multiple of the process count. Every rank yields the smallest rank's sample count (the
  extra samples of larger shards are dropped that epoch), so DDP ranks never wait on each
  other at the end of an epoch.
- **Workers** of a rank read the rank's shards and keep every ``num_workers``-th sample (an
  uncompressed tar is seeked through, so a worker reads only its own images).
- **Epochs**: ``set_epoch(e)`` reshuffles the rank's shard order and the sample buffer,
  seeded by ``(seed, e)``; the stream of an epoch is deterministic, so a run resumed
  mid-epoch re-reads and skips the batches it had consumed.
- **Broken images** are replaced by the worker's previous (or next) good sample, so counts
  stay exact; the replacement carries the broken name to the loader's counter, including
  broken files after the last good sample.
"""

from __future__ import annotations

import functools
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
from .paths import is_system_path
from .skips import SkipCounter

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
_SHUFFLE_BUFFER = 256
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


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


def shard_fields(path: str, probe: int = 20) -> set[str]:
    """What the first ``probe`` members of the tar hold: ``"cls"`` when a ``.cls`` member is among
    them, ``"txt"`` when some sample has both an image and a ``.txt`` member (a caption)."""
    found, images, texts = set(), set(), set()
    try:
        with tarfile.open(path, "r|*") as tf:
            for k, m in enumerate(tf):
                if m.isfile() and not is_system_path(m.name):
                    key, ext = _split_key(m.name)
                    if ext == "cls":
                        found.add("cls")
                    (images if ext in _IMAGE_EXTS else texts if ext == "txt" else set()).add(key)
                if k >= probe:
                    break
    except _TAR_ERRORS as e:
        raise corrupt_archive(path, e) from None
    return found | ({"txt"} if images & texts else set())


def is_webdataset_tar(path: str, probe: int = 20) -> bool:
    """True if the first members of the tar look like WebDataset samples (a ``.cls`` member among them)."""
    return "cls" in shard_fields(path, probe)


def _members(tf: tarfile.TarFile):
    """``(key, ext, member)`` of the data members, system files left out."""
    for m in tf:
        if m.isfile() and not is_system_path(m.name):
            key, ext = _split_key(m.name)
            yield key, ext, m


def _captions(data: bytes) -> tuple[str, ...]:
    return tuple(line.strip() for line in data.decode("utf-8", errors="replace").splitlines() if line.strip())


@functools.lru_cache(maxsize=1024)
def _shard_index(path: str, mtime: float, field: str = "cls") -> tuple[tuple[str, int | tuple[str, ...]], ...]:
    """``(key, label)`` of every sample of a shard that has both an image and a ``.cls`` member;
    with ``field="txt"``, ``(key, captions)`` of the samples with an image and a non-empty ``.txt``."""
    has_image: set[str] = set()
    labels: dict[str, int | tuple[str, ...]] = {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for key, ext, m in _members(tf):
                if ext in _IMAGE_EXTS:
                    has_image.add(key)
                elif ext == "txt" and field == "txt":
                    if caps := _captions(tf.extractfile(m).read()):
                        labels[key] = caps
                elif ext == "cls" and field == "cls":
                    text = tf.extractfile(m).read().decode(errors="replace").strip()
                    try:
                        labels[key] = int(text)
                    except ValueError:
                        raise DataError(
                            f"{path}: {m.name} holds {text[:40]!r}, expected an integer class index"
                        ) from None
    except _TAR_ERRORS as e:
        raise corrupt_archive(path, e) from None
    return tuple((k, y) for k, y in labels.items() if k in has_image)


def _in_val(key: str, val_fraction: float, seed: int) -> bool:
    return zlib.crc32(f"{seed}:{key}".encode()) / 2**32 < val_fraction


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class WebDatasetShards(IterableDataset):
    """Stream ``(PIL image, label)`` from WebDataset shards (see the module notes).

    Args:
        shards: tar paths.
        split: "train" or "val" to split the samples by a seeded hash of their key
            (``val_fraction`` of them go to val); None to use every sample (shards already split).
        shuffle: shuffle shard order and, within a buffer of 256, samples, seeded by ``(seed, epoch)``.
        num_classes: the class count; the largest ``.cls`` value + 1 when None.
        captions: read ``.txt`` captions instead of ``.cls`` labels (image-text shards).

    ``len(ds)`` is the number of samples over all ranks; :meth:`worker_counts` what each worker
    of this rank yields.
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
        captions: bool = False,
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
        self._num_classes = 0 if captions else num_classes
        self.field = "txt" if captions else "cls"
        self._split_cache: dict[str, list[tuple[str, int]]] = {}
        self.world: tuple[int, int] | None = None  # (world size, rank); None: ask torch.distributed

    def _keep(self, key: str) -> bool:
        if self.split is None:
            return True
        return _in_val(key, self.val_fraction, self.seed) == (self.split == "val")

    def _samples_of(self, shard: str) -> list[tuple[str, int]]:
        """``(key, label)`` of this split's samples in one shard, in tar order."""
        if shard not in self._split_cache:
            index = _shard_index(shard, os.path.getmtime(shard), self.field)
            self._split_cache[shard] = [(k, y) for k, y in index if self._keep(k)]
        return self._split_cache[shard]

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            self._num_classes = 1 + max(
                (y for s in self.shards for _, y in _shard_index(s, os.path.getmtime(s))), default=-1
            )
        return self._num_classes

    @property
    def classes(self) -> list[str]:
        return [str(k) for k in range(self.num_classes)]

    @property
    def targets(self) -> list[int]:
        """Labels of this split's samples in shard order."""
        return [y for s in self.shards for _, y in self._samples_of(s)]

    def __len__(self) -> int:
        return sum(len(self._samples_of(s)) for s in self.shards)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_shards(self) -> tuple[list[str], int]:
        """(this rank's shards in this epoch's order, samples per rank)."""
        world, rank = self.world or _world()
        if len(self.shards) % world:
            raise DataError(
                f"{len(self.shards)} shards cannot be split evenly over {world} processes: each process reads "
                f"whole shards, so use a multiple of {world} shards (re-shard the data, or run fewer processes)"
            )
        per_rank = min(sum(len(self._samples_of(s)) for s in self.shards[r::world]) for r in range(world))
        shards = self.shards[rank::world]
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, rank]).permutation(len(shards))
            shards = [shards[k] for k in order]
        return shards, per_rank

    def worker_counts(self, num_workers: int) -> list[int]:
        """Samples that each of ``num_workers`` DataLoader workers of this rank yields."""
        _, per_rank = self._rank_shards()
        nw = max(1, num_workers)
        return [len(range(w, per_rank, nw)) for w in range(nw)]

    def _slots(self):
        """``(shard, {key: label})`` of the samples this worker yields, in stream order."""
        shards, per_rank = self._rank_shards()
        info = get_worker_info()
        nw, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        n = 0
        for shard in shards:
            mine = {}
            for key, label in self._samples_of(shard):
                if n >= per_rank:
                    break
                if n % nw == wid:
                    mine[key] = label
                n += 1
            if mine:
                yield shard, mine

    def _read(self):
        """Yield ``(key, image | None, label, bad_file | None)`` for each of this worker's samples."""
        for shard, mine in self._slots():
            try:
                with tarfile.open(shard, "r:*") as tf:
                    for key, ext, m in _members(tf):
                        if ext not in _IMAGE_EXTS or key not in mine:
                            continue
                        label = self._target(key, mine.pop(key))
                        try:
                            img = decode_image(tf.extractfile(m).read(), self.in_chans, name=f"{shard}:{key}")
                        except BadImageError as e:
                            yield key, None, label, str(e)
                            continue
                        yield key, img, label, None
            except _TAR_ERRORS as e:
                raise corrupt_archive(shard, e) from None

    def _target(self, key: str, value):
        """The class index, or for image-text shards the caption target."""
        if self.field == "cls":
            return value
        return {"captions": list(value), "label": None, "image_id": zlib.crc32(key.encode())}

    def _padded(self):
        """:meth:`_read` with each broken image replaced by a neighbouring good one, which carries its name."""
        last = None
        waiting: list[str] = []  # broken names met before the first good sample
        for key, img, label, bad in self._read():
            if img is None:
                if last is None:
                    waiting.append(bad)
                else:
                    yield last[0], last[1], last[2], [bad]
                continue
            last = (key, img, label)
            for name in waiting:
                yield key, img, label, [name]
            waiting = []
            yield key, img, label, []
        if waiting:
            raise DataError(
                "every image this data loader worker read is broken, e.g. " + ", ".join(waiting[:3])
                + "; check the shards (vitkit cannot train on them)"
            )

    def samples(self):
        """Yield ``(key, image, label, bad_files)``; see the module notes for the order and broken files."""
        if not self.shuffle:
            yield from self._padded()
            return
        info = get_worker_info()
        _, rank = self.world or _world()
        rng = np.random.default_rng([self.seed, self.epoch, rank, 0 if info is None else info.id])
        buffer = []
        for item in self._padded():
            buffer.append(item)
            if len(buffer) >= _SHUFFLE_BUFFER:
                yield buffer.pop(int(rng.integers(len(buffer))))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        for _, img, label, bad in self.samples():
            self.skips.add(1, bad)
            yield img, label
