"""TensorFlow-style 'SAME' padding: the output is ceil(input / stride) for any input size."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def pad_same(x: torch.Tensor, kernel_size: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad a (B, C, H, W) map so a (kernel_size, stride) window gives ceil(H / stride) x ceil(W / stride).

    The extra pixel of an odd total goes to the bottom / right, as TensorFlow does, which
    checkpoints trained there (BiT, hybrid ViTs) rely on.
    """
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dim first
        total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


class MaxPool2dSame(nn.Module):
    """Max pooling with 'SAME' padding (padded with -inf, so the padding never wins)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(pad_same(x, self.kernel_size, self.stride, value=-math.inf), self.kernel_size, self.stride)
