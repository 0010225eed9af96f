"""Weight-standardised convolution (Qiao et al., 2019), the conv of BiT and hybrid-ViT ResNets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .same_pad import pad_same


class StdConv2dSame(nn.Conv2d):
    """Conv2d whose kernel is standardised per output channel (zero mean, unit variance) on every
    call, with 'SAME' padding. Paired with GroupNorm it trains without batch statistics."""

    def __init__(
        self, in_chans: int, out_chans: int, kernel_size: int, stride: int = 1, bias: bool = False, eps: float = 1e-8
    ):
        # At stride 1 'SAME' is a fixed symmetric padding the conv can do itself; otherwise it depends on the size.
        static = stride == 1 and kernel_size % 2 == 1
        super().__init__(in_chans, out_chans, kernel_size, stride=stride, padding=kernel_size // 2 if static else 0, bias=bias)
        self.dynamic_pad = not static
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(self.out_channels, -1)  # (out, in * k * k)
        w = F.batch_norm(w[None], None, None, training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)
        if self.dynamic_pad:
            x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
