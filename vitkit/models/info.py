"""Model arithmetic: parameters per part, FLOPs, tokens and attention memory per resolution and stage.

Everything is computed on the meta device, so even ViT-H costs no memory or time. The model
describes its own stages (``attention_stats``), so this works for isotropic and hierarchical
backbones alike.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ._builder import create_model


def _count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def count_flops(model: torch.nn.Module, input_size: tuple[int, int, int] | torch.Tensor, batch: int = 1) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass, counted op by op.

    ``input_size`` (C, H, W) counts on the meta device (``model`` must be on it or movable);
    a tensor counts ``model(x)`` as run on its device, so data-dependent paths (token merging) show.
    """
    return _flops(model, input_size, batch).get_total_flops()


def _flops(model: torch.nn.Module, input_size: tuple[int, int, int] | torch.Tensor, batch: int = 1) -> FlopCounterMode:
    real = isinstance(input_size, torch.Tensor)
    x = input_size if real else torch.empty(batch, *input_size, device="meta")
    counter = FlopCounterMode(display=False)
    # Not every fused attention kernel has a FLOP formula (the CPU flash kernel has none); the math
    # path's matmuls are the same FLOPs, counted.
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH) if real else contextlib.nullcontext():
        model(x)
    return counter


def _module_flops(counter: FlopCounterMode, model: torch.nn.Module, module: str) -> int:
    """FLOPs counted inside submodule ``module`` (a dotted name) during the counted forward."""
    counts = counter.get_flop_counts()
    prefix = f"{type(model).__name__}.{module}"
    inside = [k for k in counts if k == prefix or k.startswith(prefix + ".")]
    # Outermost calls only: a stage may run its children directly, and a child's count includes its own.
    outer = [k for k in inside if not any(k.startswith(o + ".") for o in inside if o != k)]
    return int(sum(sum(counts[k].values()) for k in outer))


def _param_parts(model: torch.nn.Module) -> OrderedDict:
    parts = OrderedDict()
    own = sum(p.numel() for p in model.parameters(recurse=False))
    if own:
        parts["tokens + pos_embed"] = own
    for name, child in model.named_children():
        if _count(child):
            parts[name] = _count(child)
    blocks = model.block_modules()
    parts["blocks (all)"] = sum(_count(b) for b in blocks)
    parts["per block"] = _count(blocks[0])
    for part in ("attn", "mlp"):
        if hasattr(blocks[0], part):
            parts[f"per block: {'attention' if part == 'attn' else part}"] = _count(getattr(blocks[0], part))
    return parts


def model_info(name: str, resolutions: tuple[int, ...] | None = None, **overrides) -> dict:
    """Config, parameters per part, and per-resolution (and per-stage) tokens / FLOPs / attention memory.

    Attention memory is the size of one layer's (B=1, heads, queries, keys) weight matrix
    (all windows together for windowed attention), which is what the fused kernel avoids
    materialising and the capture path does materialise. Per resolution, ``tokens`` and
    ``grid`` are the first stage's and the attention memory is the largest stage's.
    """
    with torch.device("meta"):
        model = create_model(name, **overrides).eval()
    card = model.card
    C, H, W = card.input_size
    resolutions = resolutions or tuple(sorted({H, 224, 384}))
    if not hasattr(model, "attention_stats"):  # convolutional and all-MLP backbones: no tokens to count
        return _backbone_info(name, model, resolutions, overrides)
    per_res = []
    for r in resolutions:
        counter = _flops(model, (C, r, r))
        stages = []
        for i, st in enumerate(model.attention_stats(r, r)):
            flops = _module_flops(counter, model, st["module"])
            stages.append(dict(
                st, stage=i, gflops=flops / 1e9, gmacs=flops / 2e9,
                attn_matrix_mib_fp32_per_layer=st["attn_elems"] * 4 / 2**20,
            ))
        flops = counter.get_total_flops()
        attn_elems = max(s["attn_elems"] for s in stages)
        per_res.append({
            "resolution": r,
            "grid": stages[0]["grid"],
            "tokens": stages[0]["tokens"],
            "gflops": flops / 1e9,
            "gmacs": flops / 2e9,
            "attn_matrix_mib_fp32_per_layer": attn_elems * 4 / 2**20,
            "attn_matrix_mib_bf16_per_layer": attn_elems * 2 / 2**20,
            "stages": stages,
        })
    stats = model.attention_stats(H, W)
    return {
        "name": name,
        "card": card.to_dict(),
        "config": dict(model.model_args),
        "depth": len(model.block_modules()),
        "num_heads": stats[0]["heads"] if len(stats) == 1 else [s["heads"] for s in stats],
        "embed_dim": model.embed_dim,
        "params": sum(p.numel() for p in model.parameters()),
        "params_per_part": dict(_param_parts(model)),
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
