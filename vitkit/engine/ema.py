"""Exponential moving averages of weights: the run's EMA copy (with a decay warm-up) and the
EMA teachers / momentum encoders of self-supervised objectives share one update."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(decay: float, updates: int, warmup: bool = True) -> float:
    """Decay used by update number ``updates`` (counting from 0).

    With warm-up: ``min(decay, (1 + t) / (10 + t))``, so the first updates follow the model
    closely (0.1, 0.18, 0.25, ...) and a short run's average is not mostly its random
    initialisation; the warm-up ends near ``t = (10 * decay - 1) / (1 - decay)`` (about 9000
    updates for 0.9999, 890 for 0.999).
    """
    if not warmup:
        return decay
    return min(decay, (1.0 + updates) / (10.0 + updates))


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float, buffers: bool = False) -> None:
    """``target = decay * target + (1 - decay) * source`` over parameters (same structure).

    With ``buffers``, floating-point buffers (BatchNorm running stats) are averaged the same way
    and integer buffers (``num_batches_tracked``) copied; without, buffers are left alone. Entries
    that are not finite in the source (an attention mask's -inf: a constant, not a statistic) are
    copied, since averaging -inf with itself gives NaN.
    """
    w = 1.0 - decay
    t = list(target.parameters())
    s = [p.detach().to(e.dtype) for p, e in zip(source.parameters(), t)]
    if t:
        torch._foreach_lerp_(t, s, w)
    if not buffers:
        return
    for e, b in zip(target.buffers(), source.buffers()):
        if e.is_floating_point():
            b = b.detach().to(e.dtype)
            e.copy_(torch.where(torch.isfinite(b), e.lerp(b, w), b))
        else:
            e.copy_(b)


class ModelEma(nn.Module):
    """A float32 copy of ``model`` updated as ``ema = d * ema + (1 - d) * model``.

    ``d`` is :func:`ema_decay_at` of the update count ``updates``. Floating-point buffers
    (BatchNorm running stats) are averaged like the weights; integer buffers (``num_batches_tracked``) are copied. Call :meth:`update` after
    each optimizer step.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).float().eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0  # saved by the trainer beside the EMA weights

    def current_decay(self) -> float:
        return ema_decay_at(self.decay, self.updates, self.warmup)

    def update(self, model: nn.Module) -> None:
        ema_update(self.module, model, self.current_decay(), buffers=True)
        self.updates += 1

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
