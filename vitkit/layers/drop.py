"""Stochastic depth (DropPath): drop a whole residual branch per sample while training."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Zero the branch for a random subset of samples and rescale the rest by 1/keep.

    Identity in eval mode and when ``drop_prob == 0``.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
