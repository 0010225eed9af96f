"""Capture attention weights from every Attention module of a model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .attention import AttentionCore


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, each forward appends (B, heads, N, N) weights per attention layer.

    >>> with capture_attention(model) as maps:
    ...     model(x)
    >>> len(maps) == depth
    """
    maps: list[torch.Tensor] = []
    modules = [m for m in model.modules() if isinstance(m, AttentionCore)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no vitkit Attention layers to capture")
    for m in modules:
        m.captured = maps
    try:
        yield maps
    finally:
        for m in modules:
            m.captured = None
