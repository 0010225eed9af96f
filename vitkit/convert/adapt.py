"""Fit a converted state dict to a concrete model: the family's filter, position and patch embeddings, heads.

Converters (``timm.py``, ``hf.py``, ...) only rename. What depends on the model being loaded,
a different grid, patch size, channel count or class count, is resolved here, for every format;
what one family needs is the model's own ``checkpoint_filter``, applied first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import resample_abs_pos_embed


@dataclass
class AdaptLog:
    """What ``adapt_to_model`` changed: resampled tensors and dropped or re-initialised parts."""

    resampled: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def resample_patch_kernel(
    weight: torch.Tensor, new_size: tuple[int, int], interpolation: str = "bicubic", antialias: bool = True
) -> torch.Tensor:
    """Resize a (D, C, ph, pw) patch-embedding kernel to a new patch size (FlexiViT, Beyer et al. 2023).

    With R the linear map that resizes a patch, the new kernel w' solves R^T w' = w in the
    least-squares sense (w' = pinv(R^T) w), so <resize(x), w'> = <x, w>: the projection of a
    resized patch equals the original projection. Exact when the patch grows; the closest
    fit when it shrinks (information is lost). A plain resize of the kernel would instead
    scale every token by the change in pixel count.
    """
    old_size = tuple(weight.shape[-2:])
    new_size = tuple(new_size)
    if old_size == new_size:
        return weight
    n_old = old_size[0] * old_size[1]
    basis = torch.eye(n_old, dtype=torch.float64).reshape(n_old, 1, *old_size)
    resize = F.interpolate(basis, size=new_size, mode=interpolation, antialias=antialias, align_corners=False)
    resize = resize.reshape(n_old, -1).T  # R: (n_new, n_old), column j = resized basis patch j
    pinv = torch.linalg.pinv(resize.T)  # (n_new, n_old)
    D, C = weight.shape[:2]
    out = weight.to(torch.float64).reshape(D * C, n_old) @ pinv.T  # (D*C, n_new)
    return out.reshape(D, C, *new_size).to(weight.dtype)


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a (D, C, ph, pw) kernel trained on C channels to ``in_chans`` channels.

    One channel: sum over C, so a gray image gives the projection the RGB model gives that
    image replicated to every channel. More channels: tile the kernel and rescale by C/in_chans
    so a replicated input keeps the same activation scale (timm ``adapt_input_conv``).
    """
    C = weight.shape[1]
    if in_chans == C:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_chans / C)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (C / in_chans)


def _grid_rows(n_rows: int, candidates: list[int], model_grid: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """How many of ``n_rows`` position rows are prefix rows, and the grid of the rest."""
    for prefix in candidates:
        if n_rows - prefix == model_grid[0] * model_grid[1]:
            return prefix, model_grid
    for prefix in candidates:
        side = math.isqrt(max(n_rows - prefix, 0))
        if side > 0 and side * side == n_rows - prefix:
            return prefix, (side, side)
    raise ValueError(
        f"checkpoint pos_embed has {n_rows} rows, which is no square grid plus {sorted(set(candidates))} "
        f"prefix rows; non-square checkpoints need a model built at the checkpoint's grid"
    )


def _adapt_pos_embed(sd: dict, model: nn.Module, log: AdaptLog) -> None:
    pe = sd.get("pos_embed")
    if pe is None or getattr(model, "pos_embed", None) is None:
        return
    tokens = [(name, t.shape[1]) for name in ("cls_token", "dist_token", "reg_token") if (t := sd.get(name)) is not None]
    n_tokens = sum(n for _, n in tokens)
    candidates = [n_tokens, *([1] if "cls_token" in sd else []), 0]
    ck_prefix, ck_grid = _grid_rows(pe.shape[1], candidates, model.patch_embed.grid_size)
    model_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    if ck_prefix != model_prefix:
        # Row i belongs to token i in the order [cls][dist][reg...]. A token's position row is
        # the same for every image, so folding it into the token (model without prefix rows) or
        # giving a token a zero row (model with prefix rows) leaves the forward unchanged.
        prefix_rows, grid_rows = pe[:, :ck_prefix], pe[:, ck_prefix:]
        rows, start = [], 0
        for name, n in tokens:
            for j in range(n):
                i = start + j
                row = prefix_rows[:, i] if i < ck_prefix else None
                if i < model_prefix:
                    rows.append(row if row is not None else torch.zeros_like(pe[:, 0]))
                elif row is not None:
                    tok = sd[name].clone()
                    tok[:, j] += row[0]
                    sd[name] = tok
            start += n
        pe = torch.cat([torch.stack(rows, dim=1), grid_rows], dim=1) if rows else grid_rows
        action = "folded into the prefix tokens" if ck_prefix > model_prefix else "added as zero rows"
        log.notes.append(
            f"pos_embed prefix rows: checkpoint has {ck_prefix}, model has {model_prefix}; {action} (exact)"
        )
    if ck_grid != tuple(model.patch_embed.grid_size):
        pe = resample_abs_pos_embed(pe, model.patch_embed.grid_size, ck_grid, num_prefix_tokens=model_prefix)
        log.resampled.append(f"pos_embed: grid {ck_grid} -> {tuple(model.patch_embed.grid_size)}")
    sd["pos_embed"] = pe


def _adapt_patch_embed(sd: dict, model: nn.Module, log: AdaptLog) -> None:
    w = sd.get("patch_embed.proj.weight")
    target = model.patch_embed.proj.weight
    if w is None:
        return
    D, C, ph, pw = target.shape
    if w.ndim == 2:
        # Early ViT ports store the projection as a Linear over flattened (C, ph, pw) patches.
        side = math.isqrt(w.shape[1] // C) if w.shape[1] % C == 0 else 0
        if side * side * C != w.shape[1]:
            raise ValueError(f"patch_embed.proj.weight {tuple(w.shape)} is not a flattened (D, {C}, P, P) kernel")
        w = w.reshape(w.shape[0], C, side, side)
    if w.shape[1] != C:
        log.resampled.append(f"patch_embed.proj.weight: in_chans {w.shape[1]} -> {C}")
        w = adapt_input_channels(w, C)
    if tuple(w.shape[-2:]) != (ph, pw):
        log.resampled.append(f"patch_embed.proj.weight: patch {tuple(w.shape[-2:])} -> {(ph, pw)} (FlexiViT pinv resize)")
        w = resample_patch_kernel(w, (ph, pw))
    sd["patch_embed.proj.weight"] = w


def _adapt_heads(sd: dict, model: nn.Module, target: dict, log: AdaptLog) -> None:
    # A checkpoint's head the model lacks (a distillation head into a plain model) stays unexpected: the load fails.
    names = model.classifier_names() if hasattr(model, "classifier_names") else ["head"]
    for head in names:
        ck = {k for k in sd if k.startswith(head + ".")}
        mk = {k for k in target if k.startswith(head + ".")}
        ck_classes = sd[f"{head}.weight"].shape[0] if f"{head}.weight" in sd else 0
        m_classes = target[f"{head}.weight"].shape[0] if f"{head}.weight" in target else 0
        if ck == mk and all(sd[k].shape == target[k].shape for k in mk):
            continue
        if ck and not mk:
            for k in ck:
                sd.pop(k)
            log.dropped.append(f"{head} dropped: checkpoint has {ck_classes} classes, model has no head (num_classes=0)")
        elif ck and mk:
            for k in ck:
                sd.pop(k)
            sd.update({k: target[k] for k in mk})
            log.dropped.append(
                f"{head} dropped: checkpoint has {ck_classes} classes, model has {m_classes}; "
                "the new head is trained from scratch"
            )
        elif mk:
            sd.update({k: target[k] for k in mk})
            log.notes.append(
                f"checkpoint has no {head} (features only); the model's {head} ({m_classes} classes) "
                "keeps its fresh initialisation and must be trained"
            )


def adapt_to_model(state_dict: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], AdaptLog]:
    """Return a copy of a converted (timm-named) state dict that fits ``model``, and what changed."""
    sd = dict(state_dict)
    log = AdaptLog()
    if hasattr(model, "checkpoint_filter"):
        sd = dict(model.checkpoint_filter(sd, log))
    target = model.state_dict()
    if hasattr(model, "patch_embed"):
        _adapt_pos_embed(sd, model, log)
        _adapt_patch_embed(sd, model, log)
    _adapt_heads(sd, model, target, log)
    return sd, log
