"""Official MAE checkpoints (facebookresearch/mae): encoder keys are timm's, plus a decoder."""

from __future__ import annotations

import torch

# Pretraining-only parts: the pixel decoder and its mask token. A vitkit ViT is the encoder.
_DECODER_PREFIXES = ("decoder_", "mask_token")


def is_mae(state_dict: dict[str, torch.Tensor]) -> bool:
    """An MAE pretraining checkpoint: timm-style encoder keys plus ``decoder_*`` keys."""
    return "patch_embed.proj.weight" in state_dict and any(k.startswith("decoder_") for k in state_dict)


def convert_mae(state_dict: dict[str, torch.Tensor], notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """MAE state dict (already unwrapped from ``{"model": ...}``) -> vitkit state dict.

    The decoder and ``mask_token`` are dropped. ``pos_embed`` is MAE's fixed 2D sin-cos table
    with a zero class row; it loads into a learned or a ``pos_embed="sincos"`` vitkit model alike.
    """
    out, dropped = {}, []
    for k, v in state_dict.items():
        if k.startswith(_DECODER_PREFIXES):
            dropped.append(k)
        else:
            out[k] = v
    if dropped and notes is not None:
        notes.append(f"MAE decoder dropped ({len(dropped)} tensors: decoder_*, mask_token); only the encoder loads")
    return out
