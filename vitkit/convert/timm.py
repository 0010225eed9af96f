"""timm checkpoints (ViT / DeiT, Swin v1/v2, PVT v2): vitkit's parameter names are timm's, so this
is nearly identity."""

from __future__ import annotations

import re

import torch

# Buffers that some checkpoints saved although they are recomputed from the config.
_RECOMPUTED = ("relative_position_index", "attn_mask", "relative_coords_table", "attention_bias_idxs")
# The convolutional, all-MLP and conv-stem hybrid families keep their own layouts, each recognised
# by its stem: ResNet (``conv1``), ConvNeXt (``stem.0``), MLP-Mixer (``stem.proj``), LeViT
# (``stem.conv1.linear``), MobileViT (``stem.conv``) and EfficientFormer (``stem.conv1``).
_OTHER_STEMS = (
    "conv1.weight", "stem.0.weight", "stem.proj.weight", "stem.conv1.linear.weight", "stem.conv.weight",
    "stem.conv1.weight",
)


def is_timm(state_dict: dict[str, torch.Tensor]) -> bool:
    """A timm-layout model: a conv patch projection and ``blocks.N.`` (ViT, DeiT, CaiT, ConViT,
    hybrids), ``layers.N.`` (Swin) or ``stages.N.`` (PVT) stages, or the stem of one of the
    convolutional, all-MLP and conv-stem hybrid families."""
    tokens = "patch_embed.proj.weight" in state_dict and any(
        k.startswith(("blocks.", "layers.", "stages.")) for k in state_dict
    )
    return tokens or any(k in state_dict for k in _OTHER_STEMS)


def convert_timm(state_dict: dict[str, torch.Tensor], notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """timm state dict -> vitkit state dict.

    Names are shared. Differences handled here: a classifier stored as ``head.fc`` (Swin) is
    vitkit's ``head``; buffers recomputed from the config are dropped; Swin checkpoints in the
    original layout (patch merging at the end of a stage) move it to the start of the next.
    The linear patch projection of early ViT ports, ``patch_embed.proj.weight`` stored as
    (D, C*P*P), is kept as is here and reshaped to the model's conv kernel when the model is
    known (see ``adapt.adapt_to_model``), as are other model-dependent fixes (``norm`` vs
    ``fc_norm``, a mismatched head, resampling) that apply to every source format.
    """
    old_swin = "layers.0.downsample.reduction.weight" in state_dict
    # Swin keeps its classifier as ``head.fc``; vitkit's Swin calls it ``head`` (ConvNeXt and
    # MobileViT keep ``head.fc`` on both sides).
    swin = any(k.startswith("layers.") for k in state_dict) and "patch_embed.proj.weight" in state_dict
    out = {}
    for k, v in state_dict.items():
        if k.rsplit(".", 1)[-1] in _RECOMPUTED:  # LeViT / EfficientFormer bias indices: computed per size
            continue
        if old_swin:
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
        if swin and k.startswith("head.fc."):
            k = "head." + k[len("head.fc."):]
        out[k] = v
    if old_swin and notes is not None:
        notes.append("original Swin layout: patch merging moved from the end of stage N to the start of N+1")
    return out
