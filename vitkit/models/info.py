"""Model arithmetic: parameters per part, FLOPs, tokens and attention memory per resolution.

Everything is computed on the meta device, so even ViT-H costs no memory or time.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch.utils.flop_counter import FlopCounterMode

from ._builder import create_model
from .vit import VisionTransformer


def _count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def count_flops(model: torch.nn.Module, input_size: tuple[int, int, int], batch: int = 1) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass, counted op by op."""
    x = torch.empty(batch, *input_size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def model_info(name: str, resolutions: tuple[int, ...] | None = None, **overrides) -> dict:
    """Config, parameters per part, and per-resolution tokens / FLOPs / attention memory.

    Attention memory is the size of one layer's (B=1, heads, N, N) weight matrix, which
    is what the fused kernel avoids materialising and the capture path does materialise.
    """
    with torch.device("meta"):
        model = create_model(name, **overrides).eval()
    card = model.card
    C, H, W = card.input_size
    resolutions = resolutions or tuple(sorted({H, 224, 384}))
    if not isinstance(model, VisionTransformer):
        return _backbone_info(name, model, resolutions, overrides)
    parts = OrderedDict()
    parts["patch_embed"] = _count(model.patch_embed)
    tokens = [getattr(model, n, None) for n in ("cls_token", "dist_token", "reg_token", "mask_token", "pos_embed")]
    parts["tokens + pos_embed"] = sum(t.numel() for t in tokens if t is not None)
    parts["blocks"] = _count(model.blocks)
    parts["per block"] = _count(model.blocks[0])
    parts["per block: attention"] = _count(model.blocks[0].attn)
    parts["per block: mlp"] = _count(model.blocks[0].mlp)
    parts["norms"] = _count(model.norm) + _count(model.fc_norm) + _count(model.norm_pre)
    parts["head"] = _count(model.head) + _count(model.head_dist)
    total = _count(model)

    heads = model.blocks[0].attn.num_heads
    per_res = []
    for r in resolutions:
        grid = model.patch_embed.dynamic_grid(r, r)
        n = grid[0] * grid[1] + model.num_prefix_tokens
        flops = count_flops(model, (C, r, r))
        attn_elems = heads * n * n
        per_res.append({
            "resolution": r,
            "grid": list(grid),
            "tokens": n,
            "gflops": flops / 1e9,
            "gmacs": flops / 2e9,
            "attn_matrix_mib_fp32_per_layer": attn_elems * 4 / 2**20,
            "attn_matrix_mib_bf16_per_layer": attn_elems * 2 / 2**20,
        })
    return {
        "name": name,
        "card": card.to_dict(),
        "config": dict(model.model_args),
        "depth": len(model.feature_info),
        "num_heads": heads,
        "embed_dim": model.embed_dim,
        "params": total,
        "params_per_part": dict(parts),
        "resolutions": per_res,
    }


def _backbone_info(name: str, model: torch.nn.Module, resolutions: tuple[int, ...], overrides: dict) -> dict:
    """What any backbone can say about itself: parameters per top-level part, stages, FLOPs per resolution.

    Tokens and attention memory are ViT notions; they are left out here.
    """
    C = model.card.input_size[0]
    parts = OrderedDict((n, _count(m)) for n, m in model.named_children() if _count(m))
    per_res = []
    for r in resolutions:
        sized = model
        if getattr(model, "fixed_input_size", False):
            # Weights sized by the input (Mixer's token mixing): count a model built at that size.
            with torch.device("meta"):
                sized = create_model(name, **{**overrides, "img_size": r}).eval()
        flops = count_flops(sized, (C, r, r))
        per_res.append({"resolution": r, "gflops": flops / 1e9, "gmacs": flops / 2e9})
    return {
        "name": name,
        "card": model.card.to_dict(),
        "config": dict(model.model_args),
        "depth": len(model.feature_info),
        "num_heads": None,
        "embed_dim": model.num_features,
        "feature_info": [dict(f) for f in model.feature_info],
        "params": _count(model),
        "params_per_part": dict(parts),
        "resolutions": per_res,
    }
