"""timm ViT / DeiT checkpoints: vitkit's parameter names are timm's, so this is nearly identity."""

from __future__ import annotations

import torch

# The convolutional and all-MLP families keep their own layouts, each recognised by its stem:
# ResNet (``conv1``, ``layer1``), ConvNeXt (``stem.0``, ``stages``) and MLP-Mixer (``stem.proj``).
_OTHER_STEMS = ("conv1.weight", "stem.0.weight", "stem.proj.weight")


def is_timm(state_dict: dict[str, torch.Tensor]) -> bool:
    """A timm-layout model: a conv patch projection and ``blocks.N.`` blocks (ViT, DeiT, CaiT, ConViT,
    hybrids), or the stem of one of the other families."""
    vit = "patch_embed.proj.weight" in state_dict and any(k.startswith("blocks.") for k in state_dict)
    return vit or any(k in state_dict for k in _OTHER_STEMS)


def convert_timm(state_dict: dict[str, torch.Tensor], notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """timm state dict -> vitkit state dict.

    Names are shared; the only layout difference left is the linear patch projection of
    early ViT ports, ``patch_embed.proj.weight`` stored as (D, C*P*P). It is kept as is here and
    reshaped to the model's conv kernel when the model is known (see ``adapt.adapt_to_model``).
    Model-dependent fixes (``norm`` vs ``fc_norm``, a missing or mismatched head, resampling)
    also live there because they apply to every source format.
    """
    return dict(state_dict)
