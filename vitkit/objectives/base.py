"""The objective interface: what a training run optimises.

An objective owns the network being trained (``self.model``) and any extra state (teacher, EMA
teacher, centers) as submodules or buffers, so ``objective.state_dict()`` is everything a
checkpoint needs. The engine only ever calls the methods below; a new objective (distillation,
MAE, DINO) plugs into the same loop by implementing them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Objective(nn.Module):
    """Base class of every training objective.

    Subclasses set ``self.model`` and implement :meth:`forward` (and usually :meth:`evaluate`).
    The engine optimises ``objective.named_parameters()`` that require grad, so frozen state
    (an EMA teacher) is registered with ``requires_grad=False``.
    """

    model: nn.Module

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """One training forward pass.

        Args:
            batch: dict of tensors (or lists of tensors for multi-view batches), already on device.

        Returns:
            ``{"loss": scalar tensor with grad, <metric>: scalar tensors}``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward(batch) -> dict")

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, Tensor]:
        """Per-sample validation values, each of shape (B,).

        The engine sums them over the whole validation set (all-reduced across processes) and
        divides by the sample count. The default evaluates the training loss per batch, repeated
        per sample, which is only meaningful when the loss is a per-sample mean.
        """
        out = self(batch)
        first = next(iter(v for v in batch.values() if isinstance(v, Tensor)), None)
        b = first.shape[0] if first is not None else 1
        return {k: v.detach().float().expand(b) for k, v in out.items() if v.ndim == 0}

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called after each optimizer step (``step`` counts from 1): EMA teachers, schedules."""

    def no_weight_decay(self) -> set[str]:
        """Names (relative to the objective) of parameters excluded from weight decay."""
        fn = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in fn()} if callable(fn) else set()
