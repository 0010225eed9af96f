"""Splitting a labelled dataset without its own validation split, and naming its classes."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError


def stratified_split(targets: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split positions into (train, val), taking ``round(val_fraction * count)`` of each class for val.

    Every class with at least 2 items gets at least one val item. Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    targets_np = np.asarray(targets)
    val: list[int] = []
    for c in np.unique(targets_np):
        members = np.flatnonzero(targets_np == c)
        k = int(round(val_fraction * len(members)))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        val.extend(rng.permutation(members)[:k].tolist())
    val_set = set(val)
    return [i for i in range(len(targets)) if i not in val_set], sorted(val)


def class_names(names: list[str], num_classes: int | None) -> list[str]:
    """``names``, padded to ``num_classes`` (``data.num_classes``) with ``class_K`` when it asks for more."""
    if num_classes is None or num_classes == len(names):
        return list(names)
    if num_classes < len(names):
        raise ConfigError(f"data.num_classes={num_classes} but the dataset has {len(names)} classes")
    return list(names) + [f"class_{k}" for k in range(len(names), num_classes)]


def check_split(split: str, val_fraction: float) -> None:
    """A ConfigError unless ``split`` is 'train' or 'val' and ``val_fraction`` is in (0, 1): every reader's arguments."""
    if split not in ("train", "val"):
        raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
