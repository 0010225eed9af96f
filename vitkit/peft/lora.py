"""LoRA (Hu et al. 2021): a trainable low-rank update beside a frozen Linear, and its merge.

``y = x W^T + b + (dropout(x) A^T B^T) * alpha / r`` with ``A`` (r, in) drawn as a Linear's weight
(kaiming-uniform, a=sqrt(5)) and ``B`` (out, r) zero, so the model starts exactly as the base; the
defaults of the paper's code and of HF ``peft``. The wrapped Linear keeps its ``weight`` and
``bias`` under their names, so base checkpoints load unchanged, and :func:`merge_lora` folds the
update into ``weight`` and leaves a plain ``nn.Linear`` (the base model's keys, nothing to install).
"""

from __future__ import annotations

import inspect
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .config import PeftConfig, is_regex


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a low-rank trainable update; made from an existing Linear by :meth:`convert`."""

    r: int
    scaling: float

    @classmethod
    def convert(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """Turn ``linear`` into a LoRALinear in place (same module, same ``weight``/``bias``) and return it."""
        base_class = type(linear)
        linear.__class__ = cls
        linear._base_class = base_class
        linear._add_lora(r, alpha, dropout)
        return linear

    def _add_lora(self, r: int, alpha: float, dropout: float) -> None:
        w = self.weight
        self.r = r
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        # The default init of an (r, in) Linear weight, as the LoRA reference and HF peft draw A.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.lora_dropout(x) @ self.lora_A.T) @ self.lora_B.T
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense (out, in) matrix: ``B @ A * alpha / r``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merge(self) -> nn.Linear:
        """Fold the update into ``weight`` and turn back into a plain ``nn.Linear`` in place."""
        with torch.no_grad():
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
        for name in ("lora_A", "lora_B", "lora_dropout"):
            delattr(self, name)
        self.__class__ = self._base_class
        del self.r, self.scaling, self._base_class
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


def _bypassed(parent: nn.Module, child: str) -> bool:
    """Whether ``parent`` reads ``child``'s weight itself instead of calling it (an adapter there would do nothing).

    torch's MultiheadAttention and SwinV2's cosine attention (``F.linear(x, self.qkv.weight, bias)``) do so.
    """
    if isinstance(parent, nn.MultiheadAttention):
        return True
    try:
        src = inspect.getsource(type(parent).forward)
    except (OSError, TypeError):
        return False
    return f"self.{child}.weight" in src


def lora_target_names(model: nn.Module, targets: list[str], exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the Linears ``targets`` selects (see :class:`~vitkit.peft.PeftConfig`), minus those under ``exclude``.

    Linears whose parent uses the weight directly are skipped: LoRA there would not change the output.
    """
    exact = {t for t in targets if not is_regex(t)}
    patterns = [re.compile(t) for t in targets if is_regex(t)]
    modules = dict(model.named_modules())
    names = []
    for name, m in modules.items():
        if not isinstance(m, nn.Linear) or isinstance(m, LoRALinear):
            continue
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        parent_name, _, child = name.rpartition(".")
        if child not in exact and not any(p.fullmatch(name) for p in patterns):
            continue
        if not _bypassed(modules[parent_name], child):
            names.append(name)
    return names


def apply_lora(model: nn.Module, cfg: PeftConfig, exclude: tuple[str, ...] = ()) -> list[str]:
    """Add LoRA to every Linear ``cfg.lora_targets`` selects (not under ``exclude``, e.g. the head).

    Returns the names of the new parameters (``<module>.lora_A``, ``<module>.lora_B``).
    """
    names = lora_target_names(model, list(cfg.lora_targets), exclude)
    if not names:
        raise ConfigError(
            f"peft.lora_targets={list(cfg.lora_targets)} matches no Linear layer of {type(model).__name__}; "
            f"name the last component of a Linear's name (e.g. {linear_names(model)}) or a regex on the full name"
        )
    params = []
    for name in names:
        LoRALinear.convert(model.get_submodule(name), cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        params += [f"{name}.lora_A", f"{name}.lora_B"]
    return params


def linear_names(model: nn.Module) -> str:
    """The distinct last name components of the model's Linear layers, for messages."""
    found = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    return ", ".join(found[:8]) or "this model has no Linear layers"


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its Linear's weight; the model's keys become the base model's again.

    The result loads in timm or vitkit without vitkit's PEFT code and gives the same outputs as the
    unmerged model (up to float rounding). Other methods (VPT, AdaptFormer) are left as they are.
    """
    for m in list(model.modules()):
        if isinstance(m, LoRALinear):
            m.merge()
    return model


__all__ = ["LoRALinear", "apply_lora", "lora_target_names", "merge_lora"]
