"""Partial fine-tuning: the last k blocks and the final norm train, the rest stays frozen."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .config import PeftConfig

# Where a backbone keeps the norm after its last block (the flat and the nested head layouts).
FINAL_NORMS = ("norm", "fc_norm", "head.norm")


def apply_partial(model: nn.Module, cfg: PeftConfig, exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the parameters of the last ``cfg.partial_k`` of ``model.block_modules()`` and of the final norm."""
    blocks = model.block_modules()
    if cfg.partial_k > len(blocks):
        raise ConfigError(
            f"peft.partial_k={cfg.partial_k} but {type(model).__name__} has {len(blocks)} blocks; "
            f"choose 1..{len(blocks)}"
        )
    chosen = {id(p) for blk in blocks[-cfg.partial_k:] for p in blk.parameters()}
    names = []
    for n, p in model.named_parameters():
        if any(n.startswith(e + ".") for e in exclude):
            continue
        if id(p) in chosen or any(n.startswith(f + ".") for f in FINAL_NORMS):
            names.append(n)
    return names


__all__ = ["FINAL_NORMS", "apply_partial"]
