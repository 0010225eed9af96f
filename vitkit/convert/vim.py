"""Vision Mamba checkpoints (hustvl/Vim and vitkit's own): ``layers.N.mixer`` blocks of bidirectional scans."""

from __future__ import annotations

import math

import torch


def is_vim(state_dict: dict[str, torch.Tensor]) -> bool:
    """A Vim layout: a patch projection and ``layers.N.mixer.A_b_log`` (the backward scan's A)."""
    return "patch_embed.proj.weight" in state_dict and any(k.endswith(".mixer.A_b_log") for k in state_dict)


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def convert_vim(state_dict: dict[str, torch.Tensor], notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Original Vim state dict -> vitkit's (identity for vitkit's own files).

    The original ``pos_embed`` has N + 1 rows with the class token's row in the middle, at
    N // 2. vitkit keeps the N patch rows and adds the middle row to ``cls_token``: the class
    token reaches the blocks as the same sum, and the patch rows resample like a ViT's.
    """
    sd = dict(state_dict)
    pe, cls = sd.get("pos_embed"), sd.get("cls_token")
    if pe is None or cls is None or _is_square(pe.shape[1]) or not _is_square(pe.shape[1] - 1):
        return sd
    mid = (pe.shape[1] - 1) // 2
    sd["cls_token"] = cls + pe[:, mid:mid + 1]
    sd["pos_embed"] = torch.cat([pe[:, :mid], pe[:, mid + 1:]], dim=1)
    if notes is not None:
        notes.append(f"pos_embed: the middle class-token row ({mid}) folded into cls_token (exact)")
    return sd
