"""NaFlex on a vitkit ViT: a packed batch of images at their own aspect ratios through the token path.

Each image arrives as its own patch sequence (:mod:`vitkit.data.naflex`): ``patches`` (B, L, P*P*C)
padded to one length, ``patch_coord`` (B, L, 2) the (row, col) of each patch in its image's grid,
``patch_valid`` (B, L) False on padding. :func:`naflex_embed` turns that into the ``(tokens, ctx)``
of :meth:`VisionTransformer.embed`, so the model's own ``forward_tokens`` (blocks, RoPE, final
norm, ``keep`` and ``token_mask``) runs it unchanged:

- the patch embedding is the patchify convolution applied as the linear map it is (its weight
  flattened in the patches' (row, col, channel) order);
- the learned position grid is resampled PER IMAGE to that image's (h, w) grid, with the model's
  own rule (bicubic, antialiased: timm NaFlexVit's default ``pos_embed_interp_mode="bicubic"``,
  ``pos_embed_antialias=True``; a model built with ``pos_embed_interp="bilinear"`` uses bilinear
  without antialias, as its plain forward does), and each patch gets the row at its coordinate;
  sin-cos grids are computed at each (h, w); RoPE reads each patch's (row, col) from ``positions``;
- padding is excluded by an additive attention bias over keys (``TokenContext.attn_bias``,
  (B, 1, 1, N)): no real token ever attends to padding, so each image's tokens equal that image's
  own forward. Padding queries still attend to the real tokens; their outputs are finite and
  meaningless, and the pooling below ignores them.

Same results as timm's ``NaFlexVit`` on converted weights where the layouts meet (class and
register tokens without position rows, i.e. ``no_embed_class=True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import TokenContext, sincos_2d_pos_embed
from .vit import VisionTransformer


def _check_model(vit: nn.Module) -> None:
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"NaFlex runs on a vitkit VisionTransformer, got {type(vit).__name__}")
    proj = vit.patch_embed.proj
    if not isinstance(vit.patch_embed.stem, nn.Identity) or tuple(proj.kernel_size) != tuple(proj.stride):
        raise ValueError(
            "NaFlex needs a ViT whose patch embedding sees one patch at a time (a patchify convolution); "
            "a convolutional stem (conv_stem=True) mixes neighbouring patches: build the model without it"
        )


def patch_embed_linear(vit: VisionTransformer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The patchify conv of ``vit`` as a Linear on flattened patches: (weight (D, ph*pw*C), bias).

    The weight's columns are in (row, col, channel) order, the layout of NaFlex patches.
    """
    _check_model(vit)
    w = vit.patch_embed.proj.weight  # (D, C, ph, pw)
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), vit.patch_embed.proj.bias


def naflex_grids(patch_coord: torch.Tensor, patch_valid: torch.Tensor) -> list[tuple[int, int]]:
    """Each image's patch grid (h, w): one more than its largest valid (row, col) (timm's rule)."""
    masked = patch_coord.masked_fill(~patch_valid[..., None], -1)
    hw = (masked.amax(dim=1) + 1).tolist()  # (B, 2)
    return [(int(h), int(w)) for h, w in hw]


def _grid_pos_embed(vit: VisionTransformer, grid: tuple[int, int]) -> torch.Tensor:
    """The (h*w, D) patch rows of ``vit``'s position embedding at ``grid``, as its forward makes them."""
    pos = vit.pos_embed
    npt = 0 if vit.no_embed_class else vit.num_prefix_tokens
    if grid == tuple(vit.patch_embed.grid_size):
        return pos[0, npt:]
    if vit.pos_embed_type == "sincos":
        return sincos_2d_pos_embed(vit.embed_dim, grid).to(pos)
    return vit._resample_pos_embed(pos, grid, vit.patch_embed.grid_size, npt)[0, npt:]


def _check_batch(vit: VisionTransformer, patches, patch_coord, patch_valid) -> None:
    ph, pw = vit.patch_size
    D = ph * pw * vit.in_chans
    if patches.ndim != 3 or patches.shape[-1] != D:
        raise ValueError(
            f"patches must be (B, L, {D}) for this ViT (patch {ph}x{pw}, {vit.in_chans} channels), got "
            f"{tuple(patches.shape)}: patchify with the model's patch size and channel count"
        )
    if not patches.is_floating_point():
        raise ValueError(
            f"patches are {patches.dtype}: normalise them first (vitkit.data.naflex.normalize_patches)"
        )
    B, L = patches.shape[:2]
    if patch_coord.shape != (B, L, 2) or patch_coord.is_floating_point():
        raise ValueError(f"patch_coord must be (B={B}, L={L}, 2) integer (row, col), got "
                         f"{patch_coord.dtype} {tuple(patch_coord.shape)}")
    if patch_valid.shape != (B, L) or patch_valid.dtype != torch.bool:
        raise ValueError(f"patch_valid must be a (B={B}, L={L}) bool tensor, got "
                         f"{patch_valid.dtype} {tuple(patch_valid.shape)}")
    if not bool(patch_valid.any(dim=1).all()):
        raise ValueError("every image needs at least one valid patch (a row of patch_valid is all False)")


def naflex_embed(
    vit: VisionTransformer, patches: torch.Tensor, patch_coord: torch.Tensor, patch_valid: torch.Tensor
) -> tuple[torch.Tensor, TokenContext]:
    """Packed patches -> ``(tokens (B, prefix + L, D), ctx)`` for ``vit.forward_tokens``.

    patches: (B, L, ph*pw*C) normalised float; patch_coord: (B, L, 2) (row, col); patch_valid:
    (B, L) bool. ``ctx.grid`` is the batch's largest (h, w) and ``ctx.positions`` the patches' flat
    index in it (row * w_max + col), so RoPE sees each patch's own row and column.
    """
    _check_model(vit)
    _check_batch(vit, patches, patch_coord, patch_valid)
    B, L, _ = patches.shape
    weight, bias = patch_embed_linear(vit)
    x = vit.patch_embed.norm(F.linear(patches, weight, bias))  # (B, L, D)
    patch_coord = patch_coord.long().masked_fill(~patch_valid[..., None], 0)
    rows, cols = patch_coord.unbind(-1)  # (B, L) each
    grids = naflex_grids(patch_coord, patch_valid)

    patch_pos = None
    if vit.pos_embed is not None:
        # One resampled table per distinct grid, stacked; each patch gathers its row by coordinate.
        distinct = list(dict.fromkeys(grids))
        tables = [_grid_pos_embed(vit, g) for g in distinct]
        starts = torch.tensor([0] + [t.shape[0] for t in tables[:-1]], device=x.device).cumsum(0)
        which = torch.tensor([distinct.index(g) for g in grids], device=x.device)
        widths = torch.tensor([g[1] for g in grids], device=x.device)
        index = starts[which][:, None] + rows * widths[:, None] + cols  # (B, L)
        patch_pos = torch.cat(tables)[index]  # (B, L, D)
        x = x + patch_pos

    prefix = [t.expand(B, -1, -1) for t in (vit.cls_token, vit.dist_token, vit.reg_token) if t is not None]
    if prefix:
        prefix = torch.cat(prefix, dim=1)
        if vit.pos_embed is not None and not vit.no_embed_class:
            prefix = prefix + vit.pos_embed[:, : vit.num_prefix_tokens]
        x = torch.cat([prefix, x], dim=1)
    x = vit.norm_pre(vit.pos_drop(x))

    attn_bias = None
    if not bool(patch_valid.all()):
        # Masked keys get the most negative finite value: exp() of it is exactly 0 next to any real key.
        keys = torch.cat([patch_valid.new_ones(B, vit.num_prefix_tokens), patch_valid], dim=1)
        attn_bias = torch.zeros(B, 1, 1, keys.shape[1], device=x.device, dtype=torch.float32)
        attn_bias = attn_bias.masked_fill(~keys[:, None, None, :], torch.finfo(torch.float32).min)
    w_max = max(g[1] for g in grids)
    grid = (max(g[0] for g in grids), w_max)
    ctx = TokenContext(grid, vit.num_prefix_tokens, rows * w_max + cols, pos_embed=patch_pos, attn_bias=attn_bias)
    return x, ctx


def naflex_forward_features(
    vit: VisionTransformer, patches: torch.Tensor, patch_coord: torch.Tensor, patch_valid: torch.Tensor
) -> torch.Tensor:
    """Packed patches -> (B, prefix + L, D) normalised tokens (``vit.forward_tokens`` on :func:`naflex_embed`).

    The tokens of each image (prefix and valid patches) equal ``vit.forward_features`` of that
    image alone at its grid; rows at padding are meaningless.
    """
    return vit.forward_tokens(*naflex_embed(vit, patches, patch_coord, patch_valid))


def naflex_pool(vit: VisionTransformer, tokens: torch.Tensor, patch_valid: torch.Tensor) -> torch.Tensor:
    """Pool packed tokens by ``vit.global_pool``, padding excluded: (B, prefix + L, D) -> (B, D).

    ``"avg"``: the mean of each image's valid patch tokens; ``"token"``: the class token;
    ``"map"``: the attention pool over the valid patch tokens (keys masked, as timm NaFlexVit);
    ``""``: the tokens unchanged.
    """
    npt = vit.num_prefix_tokens
    B, N, _ = tokens.shape
    if patch_valid.shape != (B, N - npt) or patch_valid.dtype != torch.bool:
        raise ValueError(f"patch_valid must be a (B={B}, L={N - npt}) bool tensor over the patch tokens, "
                         f"got {patch_valid.dtype} {tuple(patch_valid.shape)}")
    pool = vit.global_pool
    if pool == "avg":
        weight = patch_valid.to(tokens.dtype)[..., None]  # (B, L, 1)
        return (tokens[:, npt:] * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)
    if pool == "token":
        return tokens[:, 0]
    if pool == "map":
        bias = torch.zeros(B, 1, 1, N - npt, device=tokens.device, dtype=tokens.dtype)
        bias = bias.masked_fill(~patch_valid[:, None, None, :], torch.finfo(tokens.dtype).min)
        return vit.attn_pool(tokens[:, npt:], attn_mask=bias)
    if pool == "":
        return tokens
    raise ValueError(f"NaFlex pooling supports global_pool 'avg', 'token', 'map' or '', not {pool!r}")


def naflex_forward_head(
    vit: VisionTransformer, tokens: torch.Tensor, patch_valid: torch.Tensor, pre_logits: bool = False
) -> torch.Tensor:
    """The classifier on packed tokens: :func:`naflex_pool`, then the model's fc-norm, dropout and head."""
    if vit.global_pool in ("token", ""):
        # No pooling over patches: the model's own head is exact (with "", rows at padding stay meaningless).
        return vit.forward_head(tokens, pre_logits=pre_logits)
    x = vit.head_drop(vit.fc_norm(naflex_pool(vit, tokens, patch_valid)))
    return x if pre_logits else vit.get_classifier()(x)


def naflex_forward(vit: VisionTransformer, batch: dict, pre_logits: bool = False) -> torch.Tensor:
    """A packed batch (``patches``, ``patch_coord``, ``patch_valid``) -> logits (or pooled features)."""
    missing = [k for k in ("patches", "patch_coord", "patch_valid") if k not in batch]
    if missing:
        raise ValueError(f"a NaFlex batch needs {missing}: build it with vitkit.data.naflex.pack or NaFlexCollate")
    tokens = naflex_forward_features(vit, batch["patches"], batch["patch_coord"], batch["patch_valid"])
    return naflex_forward_head(vit, tokens, batch["patch_valid"], pre_logits=pre_logits)


__all__ = [
    "naflex_embed", "naflex_forward", "naflex_forward_features", "naflex_forward_head", "naflex_grids",
    "naflex_pool", "patch_embed_linear",
]
