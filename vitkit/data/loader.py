"""DataLoader construction: dict batches, seeded per-sample augmentation, bad-file counting.

Batches are ``{"image": uint8 (B, C, H, W), "label": int64 (B,), "index": int64 (B,),
"skipped": int64 (B,)}``; ``skipped[i]`` is how many unreadable files were replaced to produce
sample ``i``. The loader tallies them in the main process (``loader.skips``) and raises when
more than ``max_bad_fraction`` of the files seen were bad.

Reproducibility: sample ``index`` in ``epoch`` is transformed with
``random.Random(f"{seed}:{epoch}:{index}")``, whatever worker handles it. The epoch travels
with each index from the sampler (which runs in the main process), so it is right even with
persistent workers that never see ``set_epoch``.
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


class _Transformed(Dataset):
    def __init__(self, dataset, transform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, i = key
        img, label, bad = self.dataset.load(i)
        return {
            "image": self.transform(img, sample_rng(self.seed, epoch, i)),
            "label": label, "index": i, "bad_files": bad,
        }


class _TransformedStream(IterableDataset):
    def __init__(self, dataset, transform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __iter__(self):
        for n, (key, img, label, bad) in enumerate(self.dataset.samples()):
            yield {
                "image": self.transform(img, sample_rng(self.seed, self.dataset.epoch, key)),
                "label": label, "index": n, "bad_files": bad,
            }


def collate(samples: list[dict]) -> dict:
    """Stack per-sample dicts into a batch dict (bad file names are kept as a flat list).

    A transform that returns a list of views (:class:`vitkit.data.views.MultiCrop`) gives
    ``"views"``: one stacked (B, C, H_v, W_v) tensor per view, instead of ``"image"``.
    """
    first = samples[0]["image"]
    if isinstance(first, (list, tuple)):
        images = {"views": [torch.stack([s["image"][v] for s in samples]) for v in range(len(first))]}
    else:
        images = {"image": torch.stack([s["image"] for s in samples])}
    return {
        **images,
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "skipped": torch.tensor([len(s["bad_files"]) for s in samples], dtype=torch.long),
        "bad_files": [name for s in samples for name in s["bad_files"]],
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
            self.skips.add(len(batch["label"]), bad)
            yield batch
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
) -> ImageLoader:
    """A loader of dict batches over ``dataset`` (an :class:`ImageDataset` or :class:`WebDatasetShards`).

    Args:
        transform: ``transform(img, rng) -> uint8 (C, H, W)``, e.g. TrainTransform / EvalTransform.
        train: shuffle, and drop the last incomplete batch unless ``drop_last`` says otherwise.
        sampler: an index sampler; by default a :class:`ResumableSampler` (DDP-aware when
            ``distributed``). Reach it as ``loader.sampler`` (set_epoch, advance, state_dict).
        seed: seeds the sampler order and every sample's augmentation.

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
        if sampler is not None:
            raise ConfigError("a streaming (WebDataset) dataset splits itself across workers and ranks; pass no sampler")
        dataset.shuffle = train
        # Workers are rebuilt each epoch so they pick up the dataset's new epoch.
        return ImageLoader(_TransformedStream(dataset, transform, seed), **common)
    if sampler is None:
        world = (None, None) if distributed else (1, 0)
        sampler = ResumableSampler(len(dataset), shuffle=train, seed=seed, num_replicas=world[0], rank=world[1])
    return ImageLoader(
        _Transformed(dataset, transform, seed),
        sampler=_EpochTagged(sampler),
        persistent_workers=num_workers > 0,
        **common,
    )
