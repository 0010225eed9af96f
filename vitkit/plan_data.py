"""The data path of a classification run: whether the training images are decoded once into a store
(``data.store``), and where crops, flips and RandAugment run (``data.augment_on``); the plan's
choice with its reasons (:func:`plan_data_path`), the same rule for the keys a run leaves at ``auto``
(:func:`resolve_data_path`), and the pieces the batched path is built from (:func:`batched_feed`).

The rule (:func:`choose_data_path`), the same for every dataset:

- **Store.** The images decoded at the store's size (:func:`~vitkit.data.store.source_size`) need
  N x C x S_h x S_w bytes. When that fits the memory a store may take (half of what is available
  when the run starts, or ``data.store_max_gb``), they are decoded once: in memory for one process;
  in a memory-mapped file in the run's cache when several processes of a node train (they share its
  pages, and one of them decodes). Otherwise every epoch decodes again. Streaming shards have no
  index to gather from, and objectives with their own multi-crop pipeline crop in the workers: no
  store for them.
- **Augmentation.** On a GPU, in batches on the device: there the host's per-image work is the
  bottleneck (measured on an H200: 20 ms a step at batch 128 for a 2M-parameter ViT, bound by
  decoding and per-image augmentation in the workers). On a CPU, in batches in the main process
  when the images fit a store, and per image in the workers when they do not or are decoded
  arrays already (IDX, CIFAR's python batches: nothing to decode once): per image the
  batched ops cost about twice PIL's there, but decoding once frees the cores the workers spent
  on JPEG each epoch, and the whole step is faster (``CPU_MEASURED``); without a store the
  workers decode anyway and keep the augmentation beside the model. The store serves the
  batched path only.

Runs that the plan does not choose for (recipes) keep the worker path without a store while both
keys are ``auto``; setting either one chooses the other by the rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .data.batch_ops import BatchGeometry
from .data.store import STORE_MODES, gb, open_store, source_size, store_bytes
from .data.transforms import SourceTransform
from .errors import ConfigError

STREAMING = "streaming shards are read in order, with no index to gather a batch from"
PIPELINE = "the objective brings its own pipeline (multi-crop views), cropped per image in the workers"
# Per image, one thread of this project's 2-core CPU, 128 images stored at 72 px cropped to 64 px: the batched
# crop and flip 137 us against 77 us in PIL, with RandAugment m9 345 us against 185 us; decoding a 72 px JPEG
# 83 us. Per step on both cores, decoding once wins: benchmarks/results/train_throughput.json, quiet, 2 rounds.
# Formats whose images are held as decoded uint8 arrays already (vitkit.data.arrays): a store would
# decode nothing, so on a CPU they keep the workers' per-image augmentation beside the model.
ARRAY_FORMATS = frozenset({"cifar10", "cifar100", "idx", "fashion-mnist"})
CPU_MEASURED = ("measured on 2 CPU cores with CIFAR-10 JPEGs at 64 px: 1.13x the worker path's img/s under DeiT "
                "augmentation, 1.14x with crop and flip")


def available_memory() -> int | None:
    """Bytes of memory this process can still use: the system's available memory, lowered to what a
    cgroup limit (a container) leaves; None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


def memory_limit(max_gb: float | None) -> tuple[int | None, str]:
    """(bytes a store may take, how that limit was set): ``max_gb``, else half the available memory
    (the model, the validation loader and the system keep the rest)."""
    if max_gb is not None:
        return int(max_gb * 1e9), f"data.store_max_gb={max_gb:g}"
    free = available_memory()
    if free is None:
        return None, "the available memory is unknown here; set data.store_max_gb"
    return free // 2, f"half of the {gb(free)} available; data.store_max_gb sets it"


@dataclass
class DataPath:
    """``store`` (memory | mmap | off) and ``augment_on`` (workers | device) with their reasons; the
    largest store allowed (``max_bytes``, None: unknown) and where that limit comes from."""

    store: str
    augment_on: str
    store_reason: str
    augment_reason: str
    max_bytes: int | None = None
    limit_why: str = ""


def _moved(auto_augment: str | None) -> str:
    """What the batched path moves out of the workers, for the reasons."""
    return f"crops, flips and RandAugment ({auto_augment})" if auto_augment else "crops and flips"


def choose_data_path(n: int, typical_hw: tuple[int, int], img_size: int, in_chans: int, device: str, *,
                     store: str = "auto", augment_on: str = "auto", max_gb: float | None = None,
                     auto_augment: str | None = None, processes: int = 1, arrays: bool = False) -> DataPath:
    """The rule of the module notes for ``n`` images of typical size ``typical_hw`` trained at
    ``img_size`` on ``device`` ("cuda" or "cpu"); ``store``/``augment_on`` other than ``auto`` are kept.
    ``processes``: training processes on this node; ``arrays``: the images are decoded arrays already
    (:data:`ARRAY_FORMATS`)."""
    size = source_size(typical_hw, img_size)
    need = store_bytes(n, in_chans, size)
    what = f"{n:,} images decoded at {size[0]}x{size[1]} need {gb(need)}"
    moved = _moved(auto_augment)
    # The memory limit only matters where a store can be built: a run that keeps the worker path as
    # configured reads no memory figures.
    cpu_arrays = device != "cuda" and arrays and store == "auto" and augment_on == "auto"
    may_store = store in ("auto", *STORE_MODES) and augment_on != "workers" and not cpu_arrays
    limit, limit_why = memory_limit(max_gb) if may_store else (None, "")
    fits = limit is not None and need <= limit
    if augment_on != "auto":
        a, a_why = augment_on, "as configured"
    elif device == "cuda":
        a, a_why = "device", f"GPU: {moved} batched on the device, the host only decodes"
    elif store in STORE_MODES:
        a, a_why = "device", f"data.store={store} feeds the batched path: {moved} batched in the main process"
    elif store == "auto" and fits:
        a, a_why = "device", f"CPU, the images fit a decode-once store: {moved} batched in the main process ({CPU_MEASURED})"
    else:
        why = "data.store=off" if store == "off" else "the images are decoded arrays already" if cpu_arrays \
            else "the images do not fit a store"
        a, a_why = "workers", f"CPU, {why}: {moved} per image in the workers, beside the model"
    if store != "auto":
        s, s_why = store, "as configured"
    elif cpu_arrays:
        s, s_why = "off", "the images are uint8 arrays in memory already: nothing to decode once"
    elif not may_store:
        s, s_why = "off", "the workers decode and augment each image"
    elif limit is None:
        s, s_why = "off", f"{what}; {limit_why}"
    elif not fits:
        s, s_why = "off", f"{what}, more than {gb(limit)} ({limit_why}): decoded every epoch"
    else:
        s = "mmap" if processes > 1 else "memory"
        where = f"one file in the run's cache, shared by the node's {processes} processes" if s == "mmap" else \
            "kept in memory"
        s_why = f"{what} of the {gb(limit)} allowed ({limit_why}): decoded once, {where}"
    return DataPath(s, a, s_why, a_why, limit, limit_why)


def _node_processes() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def plan_data_path(plan, info, device: str, user: dict, img_size: int, in_chans: int) -> None:
    """Set ``data.store`` and ``data.augment_on`` on ``plan`` (those the user left at ``auto``), each with
    its reason: the memory the store needs against what is available, the device, what moves out of
    the workers (the planned augmentation)."""
    store, augment_on = user.get("data.store", "auto"), user.get("data.augment_on", "auto")
    if store != "auto" and augment_on != "auto":
        return
    if info.format == "webdataset":
        path = DataPath("off", "workers", STREAMING, STREAMING)
    else:
        spec = user["data.auto_augment"] if "data.auto_augment" in user else plan.values.get("data.auto_augment")
        path = choose_data_path(info.n_train, info.typical_size, img_size, in_chans, device, store=store,
                                augment_on=augment_on, max_gb=user.get("data.store_max_gb"), auto_augment=spec,
                                processes=_node_processes(), arrays=info.format in ARRAY_FORMATS)
    if store == "auto":
        plan.set("data.store", path.store, path.store_reason)
    if augment_on == "auto":
        plan.set("data.augment_on", path.augment_on, path.augment_reason)


def resolve_data_path(d, info, device: str, img_size: int, in_chans: int, *, why_not: str | None,
                      user_keys=frozenset()) -> DataPath:
    """The data path a run takes, from its data config ``d`` (``store``, ``augment_on``, ``store_max_gb``,
    ``auto_augment``; keys left at ``auto`` chosen by the rule). ``why_not``: why this run cannot take
    the batched path (None: it can). A choice the user made that cannot work is a ConfigError; one the
    plan made (not in ``user_keys``) gives way."""
    store, augment_on = d.store, d.augment_on
    if store == "auto" and augment_on == "auto":
        return DataPath("off", "workers", "not planned: decoded in the workers", "not planned: in the workers")
    if why_not is not None:
        asked = [f"{k}={v}" for k, v, on in (("data.store", store, store in STORE_MODES),
                                              ("data.augment_on", augment_on, augment_on == "device"))
                 if on and k in user_keys]
        if asked:
            raise ConfigError(f"{' and '.join(asked)} asks for the batched path, but {why_not}; "
                              "set data.store=off and data.augment_on=workers (or leave them at auto)")
        return DataPath("off", "workers", why_not, why_not)
    if store in STORE_MODES and augment_on == "workers":
        raise ConfigError(f"data.store={store} feeds the batched path, but data.augment_on=workers crops in the "
                          "workers: set data.augment_on=device (or auto), or data.store=off")
    return choose_data_path(info.n_train, info.typical_size, img_size, in_chans, device, store=store,
                            augment_on=augment_on, max_gb=d.store_max_gb, auto_augment=d.auto_augment,
                            processes=_node_processes(), arrays=info.format in ARRAY_FORMATS)


def batched_feed(dataset, d, path: DataPath, typical_hw: tuple[int, int], img_size: int, mean, *,
                 cache_dir: str | os.PathLike, num_workers: int = 0, log=None):
    """The batched path's pieces for ``dataset``: (the workers' :class:`SourceTransform`, the decode-once
    store or None when the images are decoded every epoch, the ``BatchGeometry`` that crops, flips and
    RandAugments each batch as ``d`` says: ``scale_min``, ``hflip``, ``auto_augment``)."""
    size = source_size(typical_hw, img_size)
    store = None
    if path.store in STORE_MODES:
        store = open_store(dataset, size, mode=path.store, cache_dir=Path(cache_dir), max_bytes=path.max_bytes,
                           limit_why=path.limit_why, num_workers=num_workers, log=log)
    fill = [min(255, round(255 * v)) for v in mean]  # RandAugment's fill, as TrainTransform's
    geometry = BatchGeometry(img_size, scale=(d.scale_min, 1.0), hflip=d.hflip, auto_augment=d.auto_augment,
                             fill=tuple(fill * 3 if len(fill) == 1 else fill))
    return SourceTransform(size, dataset.in_chans), store, geometry
