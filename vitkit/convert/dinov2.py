"""Official DINOv2 checkpoints (facebookresearch/dinov2), with or without registers."""

from __future__ import annotations

import re

import torch

# Training with FSDP wraps blocks in chunks: ``blocks.<chunk>.<global index>.``; the index is global.
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")
_SWIGLU_FUSED = re.compile(r"^(blocks\.\d+\.mlp\.)w12\.(weight|bias)$")
_SWIGLU_OUT = re.compile(r"^(blocks\.\d+\.mlp\.)w3\.(weight|bias)$")


def is_dinov2(state_dict: dict[str, torch.Tensor]) -> bool:
    """Official DINOv2 layout: ``register_tokens``, a (1, D) ``mask_token`` or chunked blocks."""
    if "register_tokens" in state_dict or any(_CHUNKED.match(k) for k in state_dict):
        return True
    mask = state_dict.get("mask_token")
    return mask is not None and mask.ndim == 2 and "patch_embed.proj.weight" in state_dict


def convert_dinov2(state_dict: dict[str, torch.Tensor], notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """DINOv2 state dict -> vitkit state dict (timm names).

    ``register_tokens`` becomes ``reg_token``; ``mask_token`` (used only by the iBOT loss) is
    dropped; fused SwiGLU ``w12`` (gate rows first) splits into ``fc1_g``/``fc1_x``; ``w3`` is
    ``fc2``. The position embedding keeps DINOv2's layout (a class row, no register rows): it is
    folded for a ``no_embed_class`` model by ``adapt.adapt_to_model``, which knows the model.
    """
    out = {}
    for k, v in state_dict.items():
        if k == "mask_token":
            if notes is not None:
                notes.append("DINOv2 mask_token dropped (only used by the masked-image pretraining loss)")
            continue
        if k == "register_tokens":
            out["reg_token"] = v
            continue
        k = _CHUNKED.sub(r"blocks.\1.", k)
        if m := _SWIGLU_FUSED.match(k):
            gate, value = v.chunk(2, dim=0)
            out[f"{m[1]}fc1_g.{m[2]}"] = gate
            out[f"{m[1]}fc1_x.{m[2]}"] = value
            continue
        out[_SWIGLU_OUT.sub(r"\1fc2.\2", k)] = v
    return out
