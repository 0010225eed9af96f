"""Reduced-precision inference: bf16 / fp16 autocast around a model's forward."""

from __future__ import annotations

import contextlib

import torch

from ..engine.runtime import PRECISIONS
from ..engine.runtime import autocast as _autocast
from ..errors import ConfigError


def autocast(precision: str, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    """A context that runs matmuls and attention in ``precision`` ("fp32", "bf16", "fp16") on ``device``.

    fp32 is a no-op context. fp16 needs a GPU (CPU kernels for it are slow or missing); bf16 runs
    everywhere and keeps fp32's range, so it needs no loss scaling.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} must be one of {sorted(PRECISIONS)}")
    device = torch.device(device)
    if PRECISIONS[precision] is torch.float16 and device.type == "cpu":
        raise ConfigError("fp16 autocast is for GPUs; on a CPU use bf16 (same speed-up, fp32's range)")
    return _autocast(PRECISIONS[precision], device)


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """float32 outputs of ``model(x)`` run under ``precision`` autocast, without autograd."""
    with autocast(precision, x.device):
        out = model(x)
    return out.float()
