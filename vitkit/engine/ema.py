"""Exponential moving average of a model's weights, evaluated alongside the trained model."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma(nn.Module):
    """A float32 copy of ``model`` updated as ``ema = decay * ema + (1 - decay) * model``.

    Buffers (e.g. BatchNorm running stats) are copied, not averaged. Call :meth:`update` after
    each optimizer step.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = list(self.module.parameters())
        src_p = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_p)]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - self.decay)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
