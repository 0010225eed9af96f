"""Training on imbalanced classes (``data.balance``): a sampler that draws every class equally often,
or the class weights of a balanced cross-entropy.

``sampler``: each draw of an epoch picks a class uniformly among the classes present, then one of
its images uniformly, with replacement: the distribution of torch's ``WeightedRandomSampler`` with
weight ``1 / n_c`` for every image of class ``c``, so minority images repeat within an epoch and
majority images are left out of it. ``loss``: every image is seen once per epoch and its
cross-entropy is weighted by ``n / (k * n_c)``, scikit-learn's ``class_weight="balanced"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import IterableDataset

from ..errors import ConfigError, DataError
from .samplers import ResumableSampler

BALANCE_MODES = ("none", "sampler", "loss")


def balanced_class_weights(class_counts: Sequence[int]) -> torch.Tensor:
    """Per-class weights (C,) float32 ``n / (k * n_c)`` for training counts ``class_counts``.

    ``n`` is the number of training images and ``k`` the number of classes that have any, as
    scikit-learn's ``compute_class_weight("balanced", ...)`` computes them: every class then carries
    the same total weight, and the weights average 1 over the training images, so the loss keeps
    its scale. A class with no training image gets weight 0 (no label carries it).
    """
    counts = torch.as_tensor([int(c) for c in class_counts], dtype=torch.float64)
    if counts.numel() == 0 or (counts < 0).any() or counts.sum() <= 0:
        raise DataError(
            f"cannot weight classes by frequency from the class counts {counts.long().tolist()}: the training "
            "split needs labelled images (check data.path), or use data.balance=none"
        )
    seen = counts > 0
    weights = torch.zeros_like(counts)
    weights[seen] = counts.sum() / (seen.sum() * counts[seen])
    return weights.float()


class ClassBalancedSampler(ResumableSampler):
    """``len(labels)`` draws per epoch (the epoch length of the data), every class drawn equally often
    in expectation: a class uniformly among those present, then one of its images uniformly, with
    replacement (the distribution of ``WeightedRandomSampler(1 / n_{label}, len(labels))``).

    The draws are a pure function of ``(seed, epoch)``; like :class:`ResumableSampler` (whose DDP
    split, ``set_epoch``, ``advance`` and resume it keeps), every rank draws the same epoch and takes
    every ``num_replicas``-th index from ``rank``.
    """

    def __init__(self, labels: Sequence[int], seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None, drop_last: bool = False):
        labels = torch.as_tensor([int(y) for y in labels], dtype=torch.int64)
        if labels.numel() and labels.min() < 0:
            raise DataError(f"class labels must be >= 0 to balance classes, found {int(labels.min())}")
        super().__init__(len(labels), shuffle=True, seed=seed, num_replicas=num_replicas, rank=rank,
                         drop_last=drop_last)
        # The indices grouped by class: the images of the j-th class present are
        # by_class[starts[j] : starts[j] + counts[j]].
        self.by_class = torch.argsort(labels, stable=True)
        self.counts = torch.unique(labels, return_counts=True)[1]
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        cls = torch.randint(len(self.counts), (self.n,), generator=g)
        counts = self.counts[cls]
        # float64: the offset within a class stays uniform for classes of any size.
        within = (torch.rand(self.n, generator=g, dtype=torch.float64) * counts).long()
        within = torch.minimum(within, counts - 1)  # u * n_c can round up to n_c for u an ulp below 1
        return self.by_class[self.starts[cls] + within].tolist()


def build_balance(mode: str, train_ds, class_counts: Sequence[int] = (), *, seed: int = 0,
                  distributed: bool = False, repeated_aug: int = 0) -> tuple[ClassBalancedSampler | None, torch.Tensor | None]:
    """What ``data.balance=mode`` asks of a classification run: ``(train sampler, class weights)``.

    ``none``: (None, None). ``sampler``: a :class:`ClassBalancedSampler` over ``train_ds.targets``
    (DDP-split when ``distributed``), to pass to the train loader. ``loss``: the
    :func:`balanced_class_weights` of ``class_counts`` (the training images per class; from
    ``train_ds.targets`` when empty), for the objective's cross-entropy.
    """
    if mode not in BALANCE_MODES:
        raise ConfigError(f"data.balance must be one of {', '.join(BALANCE_MODES)}, got {mode!r}")
    if mode == "none":
        return None, None
    targets = getattr(train_ds, "targets", None)
    if mode == "loss":
        if len(class_counts) == 0 and targets is not None:
            class_counts = torch.bincount(torch.as_tensor(list(targets), dtype=torch.int64)).tolist()
        return None, balanced_class_weights(class_counts)
    if isinstance(train_ds, IterableDataset):
        raise ConfigError(
            "data.balance=sampler needs random access to the training images, but this dataset streams from "
            "shards in order: use data.balance=loss (class-weighted cross-entropy) instead"
        )
    if repeated_aug > 1:
        raise ConfigError(
            f"data.balance=sampler and data.repeated_aug={repeated_aug} each choose which images an epoch draws: "
            "set data.repeated_aug=0, or use data.balance=loss"
        )
    if targets is None:
        raise ConfigError(
            f"data.balance=sampler needs the label of every training image, which {type(train_ds).__name__} "
            "does not list: use data.balance=loss"
        )
    world = (None, None) if distributed else (1, 0)
    return ClassBalancedSampler(targets, seed=seed, num_replicas=world[0], rank=world[1]), None


def check_weighted(objective, objective_name: str, class_weights: torch.Tensor | None) -> None:
    """A ConfigError when ``class_weights`` (``data.balance=loss``) would not reach ``objective``'s
    loss: only objectives that take ``class_weights`` (the supervised cross-entropy) can use them."""
    if class_weights is not None and getattr(objective, "class_weights", None) is None:
        raise ConfigError(
            f"data.balance=loss weights the cross-entropy of objective.name=supervised, but objective "
            f"{objective_name!r} does not take class weights: use data.balance=sampler"
        )
