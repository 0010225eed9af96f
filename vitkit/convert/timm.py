"""timm ViT / DeiT checkpoints: vitkit's parameter names are timm's, so this is nearly identity."""

from __future__ import annotations

import torch


def is_timm(state_dict: dict[str, torch.Tensor]) -> bool:
    """A timm-layout ViT: a conv patch projection and ``blocks.N.`` transformer blocks."""
    return "patch_embed.proj.weight" in state_dict and any(k.startswith("blocks.") for k in state_dict)


def convert_timm(state_dict: dict[str, torch.Tensor], notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """timm state dict -> vitkit state dict.

    Names are shared; the only layout difference left is the linear patch projection of
    early ViT ports, ``patch_embed.proj.weight`` stored as (D, C*P*P). It is kept as is here and
    reshaped to the model's conv kernel when the model is known (see ``adapt.adapt_to_model``).
    Model-dependent fixes (``norm`` vs ``fc_norm``, a missing or mismatched head, resampling)
    also live there because they apply to every source format.
    """
    return dict(state_dict)
