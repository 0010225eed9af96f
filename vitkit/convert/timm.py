"""timm ViT / DeiT checkpoints: vitkit's parameter names are timm's, so this is nearly identity."""

from __future__ import annotations

import torch

# Conv stems of timm's hybrid families (LeViT, MobileViT, EfficientFormer), followed by ``stages.N``.
_STEM_KEYS = ("stem.conv1.linear.weight", "stem.conv.weight", "stem.conv1.weight")


def is_timm(state_dict: dict[str, torch.Tensor]) -> bool:
    """A timm-layout ViT (a conv patch projection and ``blocks.N.``) or conv-stem hybrid (``stages.N.``)."""
    if "patch_embed.proj.weight" in state_dict and any(k.startswith("blocks.") for k in state_dict):
        return True
    return any(k in state_dict for k in _STEM_KEYS) and any(k.startswith("stages.") for k in state_dict)


def convert_timm(state_dict: dict[str, torch.Tensor], notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """timm state dict -> vitkit state dict.

    Names are shared; the only layout difference left is the linear patch projection of
    early ViT ports, ``patch_embed.proj.weight`` stored as (D, C*P*P). It is kept as is here and
    reshaped to the model's conv kernel when the model is known (see ``adapt.adapt_to_model``).
    Model-dependent fixes (``norm`` vs ``fc_norm``, a missing or mismatched head, resampling)
    also live there because they apply to every source format.
    """
    # LeViT / EfficientFormer store their offset-bias index tables; vitkit computes them per input size.
    return {k: v for k, v in state_dict.items() if not k.endswith("attention_bias_idxs")}
