"""Dynamic int8 quantization of the Linear layers, for CPU inference."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..errors import ConfigError


def quantize_int8(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (in eval mode) whose ``nn.Linear`` layers run with int8 weights.

    Activations are quantized on the fly per batch (dynamic quantization), so no calibration
    data is needed. The result runs on the CPU only; patch embedding convolutions, norms and
    attention's softmax stay in float32. Check the accuracy with your validation data.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ConfigError("int8 dynamic quantization runs on the CPU: move the model with model.cpu() first")
    if torch.backends.quantized.engine == "none":
        raise ConfigError("this torch build has no quantized CPU engine (fbgemm / qnnpack); int8 is unavailable")
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    with warnings.catch_warnings():
        # torch marks the eager quantization API for migration to torchao; it still works and needs nothing extra.
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(target, {nn.Linear}, dtype=torch.qint8, inplace=True)
