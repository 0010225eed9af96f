"""DataLoader construction: dict batches, seeded per-sample augmentation, bad-file counting.

Batches are ``{"image": uint8 (B, C, H, W), "label": int64 (B,), "index": int64 (B,),
"skipped": int64 (B,)}``; a dataset whose ``load`` returns a dict target (segmentation,
depth) gives ``{"image", "mask" | "depth", "index", "skipped"}`` (see :func:`collate`) and its
transform is ``transform(img, target, rng) -> dict`` (:mod:`vitkit.data.joint`). ``skipped[i]`` is how many unreadable files were replaced to produce
sample ``i``. The loader tallies them in the main process (``loader.skips``) and raises when
more than ``max_bad_fraction`` of the files seen were bad.

Reproducibility: sample ``index`` in ``epoch`` is transformed with
``random.Random(f"{seed}:{epoch}:{index}")``, whatever worker handles it. The epoch travels
with each index from the sampler (which runs in the main process), so it is right even with
persistent workers that never see ``set_epoch``.

The batched path (``data.augment_on=device``) has batches of images at one fixed size with their
original ``"orig_hw"`` (B, 2): from workers running :class:`~vitkit.data.transforms.SourceTransform`,
or gathered from a decode-once store in the main process (:class:`StoreLoader`).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from ..errors import ConfigError
from .samplers import ResumableSampler
from .skips import SkipCounter
from .webdataset import _world


def sample_rng(seed: int, epoch: int, index: int | str) -> random.Random:
    """The generator for one sample's augmentation; string seeds hash identically in every process."""
    return random.Random(f"{seed}:{epoch}:{index}")


class _EpochTagged(Sampler):
    """Yields ``(epoch, index)`` from a sampler; other attributes (set_epoch, state_dict, ...) pass through."""

    def __init__(self, sampler):
        self.inner = sampler

    def __iter__(self):
        epoch = getattr(self.inner, "epoch", 0)
        for i in self.inner:
            yield epoch, int(i)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _sample(transform, img, target, rng, index, bad, dataset) -> dict:
    """A classification sample (int label) or a dense one (dict target: the transform's fields)."""
    if not isinstance(target, dict):
        out = transform(img, rng)  # a tensor, or a dict of fields (SourceTransform: "image", "orig_hw")
        return {**(out if isinstance(out, dict) else {"image": out}), "label": target, "index": index,
                "bad_files": bad}
    out = transform(img, target, rng)
    if "mask" in out and hasattr(dataset, "ignore_index"):
        out["ignore_index"] = int(dataset.ignore_index)
    return {**out, "index": index, "bad_files": bad}


class _Transformed(Dataset):
    def __init__(self, dataset, transform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, i = key
        img, target, bad = self.dataset.load(i)
        return _sample(self.transform, img, target, sample_rng(self.seed, epoch, i), i, bad, self.dataset)


class _TransformedStream(IterableDataset):
    def __init__(self, dataset, transform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __iter__(self):
        for n, (key, img, target, bad) in enumerate(self.dataset.samples()):
            rng = sample_rng(self.seed, self.dataset.epoch, key)
            yield _sample(self.transform, img, target, rng, n, bad, self.dataset)


# Padding of each dense field where the samples of a batch differ in size (evaluation at full
# resolution): images black, depth invalid, masks the sample's ignore index.
_DENSE_FIELDS = ("image", "mask", "depth")
# Per-sample box counts differ: these stay lists even when every sample of a batch has as many.
_LIST_FIELDS = ("boxes", "labels")


def _pad_stack(tensors: list[torch.Tensor], values: list[float]) -> torch.Tensor:
    h = max(t.shape[-2] for t in tensors)
    w = max(t.shape[-1] for t in tensors)
    out = []
    for t, v in zip(tensors, values):
        ph, pw = h - t.shape[-2], w - t.shape[-1]
        out.append(t if not (ph or pw) else torch.nn.functional.pad(t, (0, pw, 0, ph), value=v))
    return torch.stack(out)


def _collate_dense(samples: list[dict]) -> dict:
    batch: dict = {}
    sizes = [tuple(s["image"].shape[-2:]) for s in samples]
    for key in samples[0]:
        if key in ("bad_files", "index", "ignore_index"):
            continue
        vals = [s[key] for s in samples]
        if key in _DENSE_FIELDS:
            pad = [s.get("ignore_index", 255) for s in samples] if key == "mask" else [0] * len(samples)
            batch[key] = _pad_stack(vals, pad)
        elif key in _LIST_FIELDS:
            batch[key] = vals
        elif isinstance(vals[0], torch.Tensor) and all(v.shape == vals[0].shape for v in vals):
            batch[key] = torch.stack(vals)
        else:
            batch[key] = vals  # per-sample lists (boxes, captions, ...) stay lists
    if "ignore_index" in samples[0]:
        batch["ignore_index"] = int(samples[0]["ignore_index"])
    if len(set(sizes)) > 1 or "boxes" in samples[0]:
        batch["size"] = torch.tensor(sizes, dtype=torch.long)
    return batch


def collate(samples: list[dict]) -> dict:
    """Stack per-sample dicts into a batch dict (bad file names are kept as a flat list).

    A transform that returns a list of views (:class:`vitkit.data.views.MultiCrop`) gives
    ``"views"``: one stacked (B, C, H_v, W_v) tensor per view, instead of ``"image"``.

    Dense samples (no ``"label"``; ``"mask"`` or ``"depth"``) are padded bottom/right to the
    largest size in the batch (image 0, mask the sample's ``"ignore_index"``, depth 0), and then
    ``"size"`` (B, 2) holds each sample's true (h, w). ``"ignore_index"`` becomes one int; other
    tensor fields of equal shape are stacked, the rest kept as per-sample lists.

    Detection samples (``"boxes"``): ``"boxes"`` and ``"labels"`` are always per-sample lists and
    ``"size"`` is always present.

    Image-text samples (``"caption"``): ``"caption"`` (one string per image) and ``"captions"``
    (every caption of each image) stay lists, ``"label"`` is -1 where an image has no class.
    """
    common = {
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "skipped": torch.tensor([len(s["bad_files"]) for s in samples], dtype=torch.long),
        "bad_files": [name for s in samples for name in s["bad_files"]],
    }
    if "caption" in samples[0]:  # image-text pairs: captions stay lists of strings
        from .captions import collate_captions

        return {**collate_captions(samples), **common}
    if "label" not in samples[0]:
        return {**_collate_dense(samples), **common}
    first = samples[0]["image"]
    if isinstance(first, (list, tuple)):
        images = {"views": [torch.stack([s["image"][v] for s in samples]) for v in range(len(first))]}
    else:
        images = {"image": torch.stack([s["image"] for s in samples])}
    if "orig_hw" in samples[0]:  # the batched path: each image's original (h, w)
        images["orig_hw"] = torch.stack([s["orig_hw"] for s in samples])
    return {
        **images,
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        **common,
    }


def _worker_init(worker_id: int) -> None:
    # Libraries drawing from numpy/random inside a worker get distinct, seed-derived streams.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class ImageLoader(DataLoader):
    """A DataLoader that counts skipped files (``skips``) and forwards ``set_epoch``.

    Over streaming shards, ``len()`` is exact for this rank: each worker batches its own
    share of the samples, so the batch count is summed per worker.
    """

    def __init__(self, *args, max_bad_fraction: float = 0.05, **kwargs):
        super().__init__(*args, **kwargs)
        self.skips = SkipCounter(max_bad_fraction)

    @property
    def _stream(self):
        return self.dataset.dataset if isinstance(self.dataset, _TransformedStream) else None

    def set_epoch(self, epoch: int) -> None:
        (self._stream or self.sampler).set_epoch(epoch)

    def __len__(self) -> int:
        if self._stream is None:
            return super().__len__()
        bs = self.batch_size
        counts = self._stream.worker_counts(self.num_workers)
        return sum(c // bs if self.drop_last else -(-c // bs) for c in counts)

    def __iter__(self):
        if self._stream is not None and self._stream.world is None:
            self._stream.world = _world()  # workers may not see the process group: pass it on
        for batch in super().__iter__():
            bad = batch.pop("bad_files")
            self.skips.add(len(batch["index"]), bad)
            yield batch
        self.skips.check(final=True)


class StoreLoader:
    """Batches gathered from a decode-once store (:class:`~vitkit.data.store.DecodedStore`) in the
    main process: no workers, no decoding, one index gather per batch.

    Batches are ``{"image": uint8 (B, C, S_h, S_w), "orig_hw": int64 (B, 2), "label", "index",
    "skipped"}`` in the sampler's order, the image in pinned memory when CUDA is available (for
    non-blocking copies). ``sampler``, ``batch_size``, ``drop_last``, ``set_epoch``, ``skips`` (the
    unreadable files the store replaced, counted as they are met) and ``len()`` are
    :class:`ImageLoader`'s; ``dataset`` is the dataset the store was decoded from.
    """

    num_workers = 0

    def __init__(self, store, dataset, batch_size: int, sampler, drop_last: bool, max_bad_fraction: float = 0.05):
        if len(store) != len(dataset):
            raise ValueError(f"the store holds {len(store)} images but the dataset {len(dataset)}")
        self.store, self.dataset, self.sampler = store, dataset, sampler
        self.batch_size, self.drop_last = batch_size, drop_last
        self.pin_memory = torch.cuda.is_available()
        self.skips = SkipCounter(max_bad_fraction)

    def __len__(self) -> int:
        n, bs = len(self.sampler), self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        order = list(self.sampler)  # the rest of the epoch: a resumed sampler starts at its position
        for k in range(0, len(order), self.batch_size):
            items = order[k : k + self.batch_size]
            if self.drop_last and len(items) < self.batch_size:
                break
            index = torch.tensor(items, dtype=torch.long)
            batch = self.store.gather(index, self.pin_memory)
            self.skips.add(len(items), self.store.bad_files(items))
            yield {**batch, "index": index}
        self.skips.check(final=True)


def build_loader(
    dataset,
    batch_size: int,
    *,
    train: bool,
    transform,
    num_workers: int = 0,
    sampler: Sampler | None = None,
    drop_last: bool | None = None,
    seed: int = 0,
    distributed: bool = False,
    max_bad_fraction: float = 0.05,
    store=None,
) -> ImageLoader | StoreLoader:
    """A loader of dict batches over ``dataset`` (an :class:`ImageDataset`, :class:`WebDatasetShards`
    or a dense dataset such as :class:`~vitkit.data.dense.DenseDataset`).

    Args:
        transform: ``transform(img, rng) -> uint8 (C, H, W)``, e.g. TrainTransform / EvalTransform;
            for dense datasets ``transform(img, target, rng) -> dict``, e.g. JointTrainTransform.
        train: shuffle, and drop the last incomplete batch unless ``drop_last`` says otherwise.
        sampler: an index sampler; by default a :class:`ResumableSampler` (DDP-aware when
            ``distributed``). Reach it as ``loader.sampler`` (set_epoch, advance, state_dict).
        seed: seeds the sampler order and every sample's augmentation.
        store: a :class:`~vitkit.data.store.DecodedStore` of ``dataset``: batches are gathered from it
            in this process (a :class:`StoreLoader`; ``transform`` and ``num_workers`` are unused).

    ``loader.set_epoch(e)`` must be called before each epoch for a new order and new augmentations.
    """
    drop_last = train if drop_last is None else drop_last
    common = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_worker_init,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        max_bad_fraction=max_bad_fraction,
    )
    if isinstance(dataset, IterableDataset):
        if sampler is not None or store is not None:
            raise ConfigError("a streaming (WebDataset) dataset splits itself across workers and ranks; pass no "
                              "sampler and no store")
        dataset.shuffle = train
        # Workers are rebuilt each epoch so they pick up the dataset's new epoch.
        return ImageLoader(_TransformedStream(dataset, transform, seed), **common)
    if sampler is None:
        world = (None, None) if distributed else (1, 0)
        sampler = ResumableSampler(len(dataset), shuffle=train, seed=seed, num_replicas=world[0], rank=world[1])
    if store is not None:
        return StoreLoader(store, dataset, batch_size, sampler, drop_last, max_bad_fraction)
    return ImageLoader(
        _Transformed(dataset, transform, seed),
        sampler=_EpochTagged(sampler),
        persistent_workers=num_workers > 0,
        **common,
    )
