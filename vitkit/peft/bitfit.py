"""BitFit (Ben Zaken et al. 2022): train only the backbone's bias terms.

As in the paper's code, every bias counts: those of the attention and MLP Linears and of the
norms (LayerNorm's beta), plus separate query/value biases (SwinV2's ``q_bias``/``v_bias``).
"""

from __future__ import annotations

from torch import nn

from .config import PeftConfig


def is_bias(name: str) -> bool:
    """A bias term by its parameter name: ``bias`` or ``*_bias`` (not a table such as ``relative_position_bias_table``)."""
    last = name.rpartition(".")[2]
    return last == "bias" or last.endswith("_bias")


def apply_bitfit(model: nn.Module, cfg: PeftConfig, exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the biases to train (none under ``exclude``, e.g. the head, which trains anyway)."""
    return [n for n, _ in model.named_parameters()
            if is_bias(n) and not any(n.startswith(e + ".") for e in exclude)]


__all__ = ["apply_bitfit", "is_bias"]
