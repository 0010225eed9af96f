"""Failures inside the loop: a non-finite loss, and errors every process learns of at the same point."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import TrainingError
from .distributed import agree_on_failure, all_reduce_sum, is_dist


class NonFiniteLossError(TrainingError):
    """The loss became NaN or inf; training stopped before applying that step."""

    def __init__(self, step: int, value: float):
        self.step = step
        self.value = value
        super().__init__(
            f"non-finite loss {value} at optimizer step {step}; no update was applied and no checkpoint "
            "with these values was written. Lower optim.lr, set optim.clip_grad, use amp=bf16 rather than "
            "fp16, or set engine.nonfinite=skip to drop such steps."
        )


class AgreedFailure(Exception):
    """Marks an error that every process learned of at the same point (all may checkpoint together)."""


def agree(error: BaseException | None) -> None:
    """A point where all processes learn whether any failed (see ``agree_on_failure``)."""
    try:
        agree_on_failure(error)
    except BaseException as e:
        raise AgreedFailure() from e


def agree_if_distributed(error: BaseException | None) -> None:
    """:func:`agree` under torch.distributed; alone, raise ``error`` (if any) as agreed."""
    if is_dist():
        agree(error)
    elif error is not None:
        raise AgreedFailure() from error


def finite_everywhere(loss: Tensor | None, error: BaseException | None, device: torch.device,
                      world_size: int) -> bool:
    """Whether ``loss`` is finite on every process; also the agreed-error point of a micro-step."""
    if not is_dist():
        if error is not None:
            raise AgreedFailure() from error
        return bool(torch.isfinite(loss.detach()))
    # One all-reduce carries both: every rank must take the same branch, or DDP's gradient
    # sync would hang.
    flags = torch.zeros(2, device=loss.device if loss is not None else device)
    flags[0] = 1.0 if error is not None else 0.0
    if loss is not None:
        flags[1] = torch.isfinite(loss.detach()).float()
    flags = all_reduce_sum(flags)
    if flags[0] > 0:
        agree(error)
    return bool(flags[1] == world_size)
