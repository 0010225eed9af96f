"""Parameter-efficient fine-tuning: freeze a pretrained backbone, train a small part of it and its head.

``apply_peft(model, PeftConfig(method="lora"))`` adapts a model in place and returns a
:class:`PeftInfo` (trainable counts, the base's sha256). Methods: linear probe, BitFit, LoRA,
VPT (shallow and deep), AdaptFormer, partial fine-tuning of the last blocks; see
:class:`PeftConfig`. :func:`merge_lora` folds LoRA into the base weights.
"""

from __future__ import annotations

from .adaptformer import apply_adaptformer
from .apply import (
    METHOD_FNS,
    PeftInfo,
    apply_peft,
    freeze_batchnorm,
    register_method,
    state_sha256,
    supported_methods,
)
from .bitfit import apply_bitfit
from .config import METHODS, PeftConfig
from .io import adapter_size, load_adapter, merge_peft, save_adapter
from .lora import LoRALinear, apply_lora, merge_lora
from .partial import apply_partial
from .vpt import apply_vpt

register_method("vpt_shallow", lambda model, cfg, exclude=(): apply_vpt(model, cfg, deep=False))
register_method("vpt_deep", lambda model, cfg, exclude=(): apply_vpt(model, cfg, deep=True))
register_method("adaptformer", lambda model, cfg, exclude=(): apply_adaptformer(model, cfg))

__all__ = [
    "LoRALinear", "METHODS", "adapter_size", "apply_adaptformer", "apply_vpt", "load_adapter", "merge_peft",
    "save_adapter", "METHOD_FNS", "PeftConfig", "PeftInfo", "apply_bitfit", "apply_lora", "apply_partial",
    "apply_peft", "freeze_batchnorm", "merge_lora", "register_method", "state_sha256", "supported_methods",
]
