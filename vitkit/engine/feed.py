"""The loop's train data: each epoch's iterator, positioned where a resumed run left off."""

from __future__ import annotations

import torch


def sampler_position(sampler, state, accum_steps: int, batch_size: int | None) -> dict:
    """The train sampler's position, from the steps taken (what ``trainer_state.pt`` stores)."""
    # Computed from the steps rather than read from the sampler: a DataLoader prefetches, so
    # the sampler has handed out more indices than were trained on.
    pos = dict(sampler.state_dict()) if hasattr(sampler, "state_dict") else {}
    pos["epoch"] = state.epoch
    pos["position"] = state.epoch_step * accum_steps * (batch_size or 1)
    return pos


def epoch_iterator(loader, sampler, state, accum_steps: int, batch_size: int | None, resume_position: dict | None):
    """An iterator over the rest of epoch ``state.epoch`` (from ``state.epoch_step``).

    With a resumable ``sampler`` it starts at ``resume_position`` (a checkpoint's) or at the
    position the steps imply; without one the consumed batches are drawn and dropped.
    """
    if sampler is not None:
        sampler.set_epoch(state.epoch)
        if state.epoch_step:
            sampler.load_state_dict(resume_position or sampler_position(sampler, state, accum_steps, batch_size))
    elif hasattr(loader, "set_epoch"):
        loader.set_epoch(state.epoch)  # streaming shards reshuffle per epoch
    # Creating the iterator draws from the global RNG (worker seeds); keep that out of the
    # training stream so a resumed run, which creates it at a different point, stays in step.
    with torch.random.fork_rng(devices=[]):
        it = iter(loader)
    if sampler is None and state.epoch_step:
        for _ in range(state.epoch_step * accum_steps):
            next(it)
    return it
