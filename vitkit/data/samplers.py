"""Seeded, distributed-aware samplers that resume mid-epoch.

The order of an epoch is a pure function of ``(seed, epoch)``, so a restarted run rebuilds it
exactly. ``position`` counts this rank's indices already consumed; the trainer reports
progress with :meth:`advance` (the DataLoader prefetches, so the sampler cannot know what was
consumed) and saves :meth:`state_dict`. After :meth:`load_state_dict`, iteration yields only
the indices not yet consumed.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


def _dist_defaults(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None or rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            num_replicas = torch.distributed.get_world_size() if num_replicas is None else num_replicas
            rank = torch.distributed.get_rank() if rank is None else rank
        else:
            num_replicas = 1 if num_replicas is None else num_replicas
            rank = 0 if rank is None else rank
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is outside [0, num_replicas={num_replicas})")
    return num_replicas, rank


class ResumableSampler(Sampler[int]):
    """Shuffled (or sequential) indices for this rank, seeded by ``seed + epoch``.

    Args:
        n: dataset length.
        shuffle: permute each epoch; otherwise 0..n-1.
        seed: base seed, shared by all ranks.
        num_replicas, rank: the DDP world; default from ``torch.distributed`` if initialised.
        drop_last: drop the tail so every rank gets ``n // num_replicas`` indices; otherwise
            pad by repeating the start so every rank gets ``ceil(n / num_replicas)``.
    """

    def __init__(
        self,
        n: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ):
        if n <= 0:
            raise ValueError(f"cannot sample from an empty dataset (n={n})")
        self.n = n
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.num_replicas, self.rank = _dist_defaults(num_replicas, rank)
        self.num_samples = n // self.num_replicas if drop_last else math.ceil(n / self.num_replicas)
        if self.num_samples == 0:
            raise ValueError(f"{n} samples cannot be split over {self.num_replicas} replicas with drop_last")
        self.epoch = 0
        self.position = 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def indices(self) -> list[int]:
        """This rank's full index list for the current epoch (ignoring ``position``)."""
        order = self._order()
        total = self.num_samples * self.num_replicas
        while len(order) < total:
            order = order + order[: total - len(order)]
        return order[:total][self.rank :: self.num_replicas]

    def __iter__(self):
        if self.position >= self.num_samples:
            self.position = 0  # a finished epoch iterated again without set_epoch starts over
        yield from self.indices()[self.position :]

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; keeps ``position`` when it is the epoch already loaded (resume)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def advance(self, n: int) -> None:
        """Record that ``n`` more indices of this epoch were consumed."""
        self.position = min(self.position + n, self.num_samples)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if "seed" in state and state["seed"] != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


class RepeatAugSampler(ResumableSampler):
    """Repeated augmentation: each index appears ``num_repeats`` times per epoch, spread over ranks.

    The repeats of one image land on different ranks (and get different augmentations), while
    each rank still sees ``ceil(n / num_replicas)`` indices per epoch (``floor`` with
    ``drop_last``), so an epoch costs the same as without repetition.
    """

    def __init__(
        self,
        n: int,
        num_repeats: int = 3,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ):
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        super().__init__(n, shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank, drop_last=drop_last)
        self.num_repeats = num_repeats

    def indices(self) -> list[int]:
        order = [i for i in self._order() for _ in range(self.num_repeats)]
        total = math.ceil(len(order) / self.num_replicas) * self.num_replicas
        while len(order) < total:
            order = order + order[: total - len(order)]
        return order[self.rank :: self.num_replicas][: self.num_samples]
