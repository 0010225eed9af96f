"""timm checkpoints: vitkit's parameter names are timm's, so the conversion is the identity.

What one family's timm checkpoints need beyond that (a renamed classifier, an older layout,
buffers vitkit recomputes, resampled bias tables) is that family's ``checkpoint_filter``, which
``adapt.adapt_to_model`` applies once the model is known, whatever the source format.
"""

from __future__ import annotations

import torch

# timm names a model's input layer ``patch_embed`` (token models), ``stem`` or ``conv1`` (CNN stems).
_INPUT_LAYERS = ("patch_embed", "stem", "conv1")


def is_timm(state_dict: dict[str, torch.Tensor]) -> bool:
    """A timm-layout model: its input layer under one of timm's names, followed by ``blocks.N.``,
    ``layers.N.`` or ``stages.N.`` for a patch embedding."""
    roots = {k.split(".", 1)[0] for k in state_dict}
    if "patch_embed" in roots:
        return "patch_embed.proj.weight" in state_dict and bool(roots & {"blocks", "layers", "stages"})
    return bool(roots & set(_INPUT_LAYERS[1:]))


def convert_timm(state_dict: dict[str, torch.Tensor], notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """timm state dict -> vitkit state dict: the same names (a copy).

    The linear patch projection of early ViT ports, ``patch_embed.proj.weight`` stored as
    (D, C*P*P), is kept as is here and reshaped to the model's conv kernel when the model is
    known (see ``adapt.adapt_to_model``), as are the family filters and other model-dependent
    fixes (a mismatched head, resampling) that apply to every source format.
    """
    return dict(state_dict)
