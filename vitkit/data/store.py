"""Decode once: every training image decoded a single time into a uint8 store.

The batched path (``data.augment_on=device``) crops, flips and RandAugments whole batches on the
training device (:class:`~vitkit.data.batch_ops.BatchGeometry`). From the data it needs each image at
one fixed size and the size the image had. :class:`DecodedStore` holds exactly that, so epochs after
the first read no image file:

- ``images`` uint8 (N, C, S_h, S_w): every image converted to the model's channels and resized to the
  store's size (:class:`~vitkit.data.transforms.SourceTransform`, the same step the workers run when
  there is no store);
- ``orig_hw`` int64 (N, 2): each image's original (h, w), so crops are drawn in its own coordinates
  with the worker path's distribution;
- ``labels`` int64 (N,), and the unreadable files replaced to produce each item (``bad``).

**The size** (:func:`source_size`): the data's typical size (the scan's median h x w), scaled down so
that its shorter side is at most twice the training resolution. Small images are stored as decoded
(CIFAR at 32 px: the decoded pixels exactly); larger ones keep enough pixels that a crop covering a
quarter of the image or more reads at least as many stored pixels as it outputs.

**Memory or a file.** ``memory`` holds the store in this process. ``mmap`` writes it once to
``<cache>/decoded-<key>.bin`` and maps it: processes of one node share the pages, and a resumed or
repeated run reads it back without decoding. The key is the data's fingerprint (:func:`fingerprint`:
the files with their sizes and modification times, or the arrays' bytes, the split, the labels, the
size and the channels), so a changed dataset gets a new store. The file starts with a header naming
the offset of a JSON description that holds the payload's sha256: a truncated or corrupt file is
detected on opening and rebuilt.

**Too large.** A store larger than it may be (``max_bytes``; a run allows ``data.store_max_gb``, else
half of the memory available when it starts: :mod:`vitkit.plan_data`) is not built: :func:`open_store`
says so in one line and returns None, and the run decodes every epoch instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .dataset import ArraySource, FileSource, TarSource
from .transforms import SourceTransform

STORE_MODES = ("memory", "mmap")
_MAGIC = b"VKSTORE1"
_HEAD = 4096  # the payload starts page-aligned after the header
_VERSION = 1  # bump when the layout or the decoding changes: old caches then miss
_CHUNK = 1 << 26  # bytes hashed at a time


def source_size(typical_hw: tuple[int, int], img_size: int) -> tuple[int, int]:
    """The store's (S_h, S_w): the typical size, scaled so its shorter side is at most ``2 * img_size``."""
    h, w = (max(1, int(v)) for v in typical_hw)
    scale = min(1.0, 2 * img_size / min(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def store_bytes(n: int, in_chans: int, size_hw: tuple[int, int]) -> int:
    """Bytes a store of ``n`` images needs: the pixels, plus (h, w) and the label of each (int64)."""
    return n * (in_chans * size_hw[0] * size_hw[1] + 24)


def gb(n: int) -> str:
    """A byte count for messages: MB below 1 GB, else GB."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _plain(v) -> bool:
    """A number, a name, or a tuple of them (a list may hold file paths, which need their mtimes)."""
    if isinstance(v, tuple):
        return all(_plain(x) for x in v)
    return isinstance(v, (bool, int, float, str, type(None)))


def fingerprint(dataset, size_hw: tuple[int, int], interpolation: str = "bicubic") -> str | None:
    """A sha256 naming the store of ``dataset`` at ``size_hw``; None for a source it cannot identify.

    Files count by path, size and modification time (a tar by its own), arrays by their bytes, a
    generated source (the built-in shapes) by its parameters; the split (indices), labels, channels,
    size and interpolation always.
    """
    src = dataset.source
    h = hashlib.sha256(json.dumps({
        "version": _VERSION, "size": list(size_hw), "in_chans": dataset.in_chans, "interpolation": interpolation,
        "source": type(src).__name__,
    }).encode())
    h.update(np.asarray(dataset.indices, dtype=np.int64).tobytes())
    h.update(np.asarray(dataset.targets, dtype=np.int64).tobytes())
    if isinstance(src, FileSource):
        for j in dataset.indices:
            h.update(_stat_line(src.paths[j]))
    elif isinstance(src, TarSource):
        h.update(_stat_line(src.path))
        h.update("\n".join(src.names).encode())
    elif isinstance(src, ArraySource):
        a = np.ascontiguousarray(src.array)
        h.update(repr((a.shape, str(a.dtype))).encode())
        h.update(memoryview(a.reshape(-1)))
    elif vars(src) and all(_plain(v) for v in vars(src).values()):
        h.update(repr(sorted(vars(src).items())).encode())
    else:
        return None
    return h.hexdigest()


def _stat_line(path: str) -> bytes:
    try:
        st = os.stat(path)
        return f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
    except OSError:
        return f"{path}\0missing\n".encode()


class DecodedStore:
    """Every image of a dataset decoded once: ``images`` uint8 (N, C, S_h, S_w), ``orig_hw`` int64
    (N, 2), ``labels`` int64 (N,), ``bad`` {item: unreadable files replaced to produce it}.

    Item ``i`` is the dataset's item ``i`` (``dataset.load(i)``: a stand-in where the file could not
    be read, as the loader would give). ``path`` is the memory-mapped file, None in memory.
    """

    def __init__(self, images: torch.Tensor, orig_hw: torch.Tensor, labels: torch.Tensor,
                 bad: dict[int, list[str]] | None = None, path: Path | None = None):
        self.images, self.orig_hw, self.labels = images, orig_hw, labels
        self.bad = dict(bad or {})
        self.path = path
        self.skipped = torch.zeros(len(labels), dtype=torch.long)
        for i, names in self.bad.items():
            self.skipped[i] = len(names)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def size_hw(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    @property
    def nbytes(self) -> int:
        return self.images.numel() + 8 * (self.orig_hw.numel() + self.labels.numel())

    def gather(self, index: torch.Tensor, pin_memory: bool = False) -> dict:
        """The items at ``index`` (int64 (B,)): ``{"image", "orig_hw", "label", "skipped"}``, the image
        gathered straight into pinned memory when asked (for non-blocking copies to a GPU)."""
        n = len(index)
        image = torch.empty((n, *self.images.shape[1:]), dtype=torch.uint8, pin_memory=pin_memory)
        torch.index_select(self.images, 0, index, out=image)
        return {"image": image, "orig_hw": self.orig_hw[index], "label": self.labels[index],
                "skipped": self.skipped[index]}

    def bad_files(self, items) -> list[str]:
        """The unreadable files replaced to produce ``items``."""
        return [name for i in items for name in self.bad.get(int(i), ())]


class _Decoded(Dataset):
    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        img, label, bad = self.dataset.load(i)
        return i, self.transform(img), label, bad


def _decode_into(dataset, tf, images, orig_hw, labels, num_workers: int) -> dict[int, list[str]]:
    """Decode every item of ``dataset`` into the given (N, ...) arrays, in parallel workers."""
    # Its own generator: decoding must not draw from the global one, which seeds the run.
    loader = DataLoader(_Decoded(dataset, tf), batch_size=64, num_workers=num_workers, collate_fn=list,
                        generator=torch.Generator().manual_seed(0))
    bad: dict[int, list[str]] = {}
    for items in loader:
        for i, out, label, names in items:
            images[i] = out["image"]
            orig_hw[i] = out["orig_hw"]
            labels[i] = label
            if names:
                bad[i] = names
    return bad


def _layout(n: int, chw: tuple[int, int, int]) -> tuple[int, int, int]:
    """(image bytes, orig_hw offset, payload bytes) of the file's payload, int64 parts 8-byte aligned."""
    image_bytes = n * chw[0] * chw[1] * chw[2]
    orig_at = -(-image_bytes // 8) * 8
    return image_bytes, orig_at, orig_at + 8 * 3 * n


def _views(payload: np.ndarray, n: int, chw: tuple[int, int, int]):
    image_bytes, orig_at, _ = _layout(n, chw)
    images = torch.from_numpy(payload[:image_bytes].reshape(n, *chw))
    orig_hw = torch.from_numpy(payload[orig_at:orig_at + 16 * n].view(np.int64).reshape(n, 2))
    labels = torch.from_numpy(payload[orig_at + 16 * n:orig_at + 24 * n].view(np.int64))
    return images, orig_hw, labels


def _sha256(payload: np.ndarray) -> str:
    h = hashlib.sha256()
    for k in range(0, len(payload), _CHUNK):
        h.update(memoryview(payload[k:k + _CHUNK]))
    return h.hexdigest()


def read_cache(path: Path, key: str) -> tuple[DecodedStore | None, str]:
    """The store in ``path`` if it is whole and made for ``key``; else (None, why not)."""
    if not path.is_file():
        return None, "none yet"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:8] != _MAGIC:
            return None, "not a vitkit store (bad header)"
        at, length = (int.from_bytes(head[k:k + 8], "little") for k in (8, 16))
        if at < _HEAD or at + length != size:
            return None, "truncated"
        f.seek(at)
        text = f.read(length)
    try:
        meta = json.loads(text)
        if meta["key"] != key or meta["version"] != _VERSION:
            return None, "made for other data"
        n, chw, sha = int(meta["n"]), tuple(int(v) for v in meta["chw"]), str(meta["sha256"])
        bad = {int(k): [str(name) for name in v] for k, v in meta["bad"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, "corrupt description"
    if len(chw) != 3 or _HEAD + _layout(n, chw)[2] != at:
        return None, "truncated"
    payload = np.memmap(path, dtype=np.uint8, mode="c", offset=_HEAD, shape=(at - _HEAD,))
    if _sha256(payload) != sha:
        return None, "corrupt (checksum mismatch)"
    return DecodedStore(*_views(payload, n, chw), bad=bad, path=path), ""


def _write_cache(path: Path, key: str, dataset, tf: SourceTransform, num_workers: int) -> None:
    """Decode ``dataset`` into a new file, then move it over ``path`` (a reader never sees half a file)."""
    n, chw = len(dataset), (dataset.in_chans, *tf.size)
    payload_bytes = _layout(n, chw)[2]
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "w+b") as f:
            if hasattr(os, "posix_fallocate"):  # a full disk fails here, not as a SIGBUS in the mapping
                os.posix_fallocate(f.fileno(), 0, _HEAD + payload_bytes)
            else:
                f.truncate(_HEAD + payload_bytes)
        payload = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=_HEAD, shape=(payload_bytes,))
        bad = _decode_into(dataset, tf, *_views(payload, n, chw), num_workers)
        payload.flush()
        meta = {"version": _VERSION, "key": key, "n": n, "chw": list(chw), "sha256": _sha256(payload),
                "bad": {str(k): v for k, v in bad.items()}}
        del payload
        text = json.dumps(meta).encode()
        with open(tmp, "r+b") as f:
            f.seek(_HEAD + payload_bytes)
            f.write(text)
            f.seek(0)
            f.write(_MAGIC + (_HEAD + payload_bytes).to_bytes(8, "little") + len(text).to_bytes(8, "little"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def open_store(
    dataset,
    size_hw: tuple[int, int],
    *,
    mode: str = "memory",
    cache_dir: str | os.PathLike | None = None,
    max_bytes: int | None = None,
    limit_why: str = "",
    num_workers: int = 0,
    interpolation: str = "bicubic",
    log: Callable[[str], None] | None = None,
) -> DecodedStore | None:
    """The :class:`DecodedStore` of ``dataset`` at ``size_hw``, decoded now or read from the cache.

    Args:
        mode: ``memory`` or ``mmap`` (a file in ``cache_dir``, reused while the data's fingerprint
            holds; a source without a fingerprint is kept in memory instead).
        max_bytes: the largest store allowed (None: no limit); ``limit_why`` says where it comes from.
        num_workers: processes decoding in parallel.
        log: receives the one line that says what happened (built, read back, rebuilt, too large).

    Returns None, after one line to ``log``, when the store would exceed ``max_bytes``.
    """
    if mode not in STORE_MODES:
        raise ValueError(f"store mode must be one of {STORE_MODES}, got {mode!r}")
    say = log or (lambda line: None)
    n = len(dataset)
    need = store_bytes(n, dataset.in_chans, size_hw)
    where = f"{n:,} training images at {size_hw[0]}x{size_hw[1]}"
    if max_bytes is not None and need > max_bytes:
        say(f"data.store={mode}: {where} need {gb(need)} decoded, more than {gb(max_bytes)} ({limit_why}): "
            "decoding them every epoch instead")
        return None
    tf = SourceTransform(size_hw, dataset.in_chans, interpolation)
    key = fingerprint(dataset, size_hw, interpolation) if mode == "mmap" else None
    t0 = time.perf_counter()
    if key is None:
        if mode == "mmap":
            say(f"data.store=mmap: the {type(dataset.source).__name__} source has no fingerprint to name a cache "
                "by; kept in memory")
        return _in_memory(dataset, tf, num_workers, say, f"{where} once into memory ({gb(need)})")
    path = Path(cache_dir if cache_dir is not None else ".") / f"decoded-{key[:16]}.bin"
    builder = _local_rank() == 0  # the node's first process builds; the others map its file
    store, why = read_cache(path, key) if builder else (None, "")
    failed = None
    if store is not None:
        say(f"read {where}, decoded, from {path} ({gb(need)})")
    elif builder:
        try:
            _write_cache(path, key, dataset, tf, num_workers)
        except OSError as e:  # a full or read-only disk: the store still fits in memory
            failed = e.strerror or str(e)
        else:
            verb = "decoded" if why == "none yet" else f"rebuilt the cache ({why}):"
            say(f"{verb} {where} once into {path} ({gb(need)}) in {time.perf_counter() - t0:.1f} s")
    _barrier()
    if failed is not None:
        say(f"data.store=mmap: cannot write {path} ({failed}); kept in memory")
        return _in_memory(dataset, tf, num_workers, say, f"{where} once into memory ({gb(need)})")
    if store is None:
        store, why = read_cache(path, key)
        if store is None:
            raise DataError(f"the decoded-image cache {path} cannot be read back ({why}); check the disk, or set "
                            "data.store=memory")
    return store


def _in_memory(dataset, tf: SourceTransform, num_workers: int, say, what: str) -> DecodedStore:
    t0 = time.perf_counter()
    n, chw = len(dataset), (dataset.in_chans, *tf.size)
    images = torch.empty((n, *chw), dtype=torch.uint8)
    orig_hw, labels = torch.empty((n, 2), dtype=torch.long), torch.empty(n, dtype=torch.long)
    bad = _decode_into(dataset, tf, images, orig_hw, labels, num_workers)
    say(f"decoded {what} in {time.perf_counter() - t0:.1f} s")
    return DecodedStore(images, orig_hw, labels, bad)
