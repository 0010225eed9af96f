"""Activations by name: the GELU variants the ViT family and its text towers use."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation OpenAI's CLIP towers were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTS = {
    "gelu": nn.GELU,
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),  # SigLIP's towers
    "quick_gelu": QuickGELU,  # OpenAI CLIP
    "silu": nn.SiLU,
    "relu": nn.ReLU,
}


def get_act_layer(name: str):
    """The activation constructor called ``name`` (one of ``gelu``, ``gelu_tanh``, ``quick_gelu``, ``silu``, ``relu``)."""
    try:
        return _ACTS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(_ACTS)}") from None
