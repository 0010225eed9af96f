"""ViTDet's plain backbone (Li et al., 2022): a ViT whose blocks attend inside non-overlapping
windows, except a few evenly spaced blocks that attend globally, with optional decomposed
relative position biases.

It is vitkit's :class:`~vitkit.models.vit.VisionTransformer` with the blocks' attention made
windowed, so parameter names are the plain ViT's (``patch_embed.proj``, ``pos_embed``,
``blocks.N.attn.qkv``...) and a plain ViT checkpoint (MAE, DeiT, timm) loads; the relative
position tables ``blocks.N.attn.rel_pos_h`` / ``rel_pos_w`` are the only new keys and start at
zero, as in the reference. The features carry no class token: a checkpoint's class token and
its position row are dropped on load (the reference keeps the row in its parameter and drops it
in every forward, which gives the same features). The position embedding is resampled to the
input's grid. Detection and SAM read the simple pyramid: ``forward_intermediates(x,
pyramid=True)`` gives the last map at strides 4/8/16/32.

Windows: the (H', W') token map is padded bottom/right to whole windows. As in the reference
the padding is zero tokens (after the block's first norm) that take part as keys
(``window_padding="zeros"``); ``window_padding="mask"`` keeps them out of attention instead,
which makes a block whose window covers the map exactly global attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Attention, TokenContext
from ..layers.capture import WindowLayout
from ..layers.windows import window_mask, window_partition, window_reverse
from ._registry import register_family
from .vit import VisionTransformer

_PADDINGS = ("zeros", "mask")


def rel_pos_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """(2L-1, head_dim) table of one axis -> (size, size, head_dim), row i col j = offset i - j.

    A table built for another length is linearly resampled to 2*size-1 rows first (the
    reference's rule for global blocks at another input size).
    """
    rows = 2 * size - 1
    if rel_pos.shape[0] != rows:
        rel_pos = F.interpolate(rel_pos.T[None], size=rows, mode="linear")[0].T
    idx = torch.arange(size, device=rel_pos.device)
    return rel_pos[idx[:, None] - idx[None, :] + size - 1]


def decomposed_rel_pos(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Additive bias (B, heads, h*w, h*w) of decomposed relative positions (MViTv2, ViTDet).

    bias[(i, j), (k, l)] = q_ij . Rh[i - k] + q_ij . Rw[j - l], with the unscaled queries
    q: (B, heads, h*w, head_dim) of an h x w map.
    """
    h, w = size
    B, nh, n, d = q.shape
    r_q = q.reshape(B, nh, h, w, d)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rel_pos_table(rel_pos_h, h))  # (B, heads, h, w, h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rel_pos_table(rel_pos_w, w))  # (B, heads, h, w, w)
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, nh, n, n)


class ViTDetAttention(Attention):
    """Multi-head attention over an (H', W') token map, inside windows or global.

    ``window_size`` 0 is global attention. ``rel_pos_size`` (the window, or the build grid for a
    global block) adds the decomposed relative position bias. A block passes the map's grid
    where a plain ViT block passes RoPE tables (ViTDet has no RoPE).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, norm_layer: type[nn.Module] = nn.LayerNorm,
                 window_size: int = 0, rel_pos_size: tuple[int, int] | None = None, window_padding: str = "zeros"):
        super().__init__(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer)
        self._setup(window_size, rel_pos_size, window_padding)

    @classmethod
    def convert(cls, attn: Attention, window_size: int, rel_pos_size: tuple[int, int] | None,
                window_padding: str = "zeros") -> ViTDetAttention:
        """Make a plain :class:`Attention` windowed in place, keeping its weights (and their names)."""
        attn.__class__ = cls
        attn._setup(window_size, rel_pos_size, window_padding)
        return attn

    def _setup(self, window_size: int, rel_pos_size: tuple[int, int] | None, window_padding: str) -> None:
        if window_padding not in _PADDINGS:
            raise ValueError(f"window_padding {window_padding!r} must be one of {_PADDINGS}")
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0 (0: global attention), got {window_size}")
        self.window_size = int(window_size)
        self.window_padding = window_padding
        self.use_rel_pos = rel_pos_size is not None
        if self.use_rel_pos:
            device = self.qkv.weight.device
            # Zero init (the reference's default): a plain ViT's weights give the plain ViT's outputs.
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, self.head_dim, device=device))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, self.head_dim, device=device))

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 0,
                attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, H'*W', C) tokens of the ``grid`` map, row-major -> (B, H'*W', C)."""
        B, N, C = x.shape
        H, W = grid
        if N != H * W or num_prefix_tokens:
            raise ValueError(
                f"ViTDet attention needs the whole {H}x{W} token map ({H * W} tokens, no prefix tokens), got {N} "
                f"tokens with {num_prefix_tokens} prefix; token merging or dropping does not apply to windowed blocks"
            )
        if not self.window_size:
            return self._attend_map(x, (H, W), attn_bias, None, None)
        if attn_bias is not None:
            raise ValueError("a windowed ViTDet block cannot take a sequence-wide attention bias")
        win = (self.window_size, self.window_size)
        Hp, Wp = -(-H // win[0]) * win[0], -(-W // win[1]) * win[1]
        # Padding after the block's norm: zero tokens, as the reference pads.
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H))
        mask = window_mask((H, W), win, (0, 0), x.device) if self.window_padding == "mask" else None
        layout = WindowLayout(grid=(Hp, Wp), window=win, size=(H, W))
        out = self._attend_map(window_partition(x, win), win, None, mask, layout)
        return window_reverse(out, win, Hp, Wp)[:, :H, :W].reshape(B, N, C)

    def _attend_map(self, x: torch.Tensor, size: tuple[int, int], bias: torch.Tensor | None,
                    mask: torch.Tensor | None, layout: WindowLayout | None) -> torch.Tensor:
        """Attention among the tokens of each (B', h*w, C) map of ``size``; mask: (nW, N, N) per window."""
        B, N, C = x.shape
        q, k, v = self.project(x)
        if self.use_rel_pos:
            rel = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, size)
            bias = rel if bias is None else bias + rel
        if mask is not None:
            # Windows are batch-major: B = images * nW, the mask repeats per image.
            mask = mask[:, None].repeat(B // mask.shape[0], 1, 1, 1)
            bias = mask if bias is None else bias + mask
        out = self.attend(q, k, v, bias, layout=layout)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


def global_blocks(depth: int) -> tuple[int, ...]:
    """ViTDet's global-attention blocks: the last block of each quarter (ViT-B: 2, 5, 8, 11)."""
    step = max(depth // 4, 1)
    return tuple(range(step - 1, depth, step))


class ViTDet(VisionTransformer):
    """ViTDet's plain ViT backbone: windowed attention with a few global blocks.

    Args (beyond :class:`~vitkit.models.vit.VisionTransformer`'s):
        window_size: window side in tokens (14 at 1024 px, patch 16).
        global_attn_indexes: the blocks with global attention; None: the last of each quarter.
        use_rel_pos: decomposed relative position bias in every block (tables per window, or
            per build grid for the global blocks, resampled at other grids).
        window_padding: "zeros" (reference) or "mask" (padding is never a key).

    There are no prefix tokens; ``global_pool`` is "avg" for classification. ``run_blocks``
    (the ViT's) runs a range of blocks on tokens from ``embed``, windowed as in ``forward_tokens``.
    """

    def __init__(self, window_size: int = 14, global_attn_indexes: tuple[int, ...] | None = None,
                 use_rel_pos: bool = True, window_padding: str = "zeros", class_token: bool = False,
                 global_pool: str = "avg", fc_norm: bool | None = False, **kwargs):
        if class_token or kwargs.get("reg_tokens") or kwargs.get("distilled"):
            raise ValueError("ViTDet has no prefix tokens: build it with class_token=False, reg_tokens=0, distilled=False")
        if kwargs.get("pos_embed") == "rope":
            raise ValueError("ViTDet uses absolute position embeddings (pos_embed 'learn', 'sincos' or 'none'), not RoPE")
        if kwargs.get("attn_type", "softmax") != "softmax":
            raise ValueError("ViTDet's windowed attention is softmax attention; attn_type must be 'softmax'")
        super().__init__(class_token=False, global_pool=global_pool, fc_norm=fc_norm, **kwargs)
        depth = len(self.blocks)
        glob = global_blocks(depth) if global_attn_indexes is None else tuple(sorted({i % depth for i in global_attn_indexes}))
        if global_attn_indexes is not None and any(not -depth <= i < depth for i in global_attn_indexes):
            raise ValueError(f"global_attn_indexes {tuple(global_attn_indexes)} are out of range for {depth} blocks")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.window_size = window_size
        self.global_attn_indexes = glob
        grid = tuple(self.patch_embed.grid_size)
        for i, blk in enumerate(self.blocks):
            is_global = i in glob
            rel = (grid if is_global else (window_size, window_size)) if use_rel_pos else None
            ViTDetAttention.convert(blk.attn, 0 if is_global else window_size, rel, window_padding)

    no_weight_decay_keys = ("pos_embed",)

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor], log) -> dict[str, torch.Tensor]:
        """A plain ViT checkpoint -> ViTDet: its prefix tokens (and their position rows) are dropped,
        and relative position tables it lacks start at zero."""
        sd = dict(state_dict)
        prefix = [n for n in ("cls_token", "dist_token", "reg_token") if n in sd]
        if prefix:
            pe = sd.get("pos_embed")
            n_tok = sum(sd[n].shape[1] for n in prefix)
            if pe is not None and self._has_prefix_rows(pe.shape[1], n_tok):
                sd["pos_embed"] = pe[:, n_tok:]
            for n in prefix:
                sd.pop(n)
            log.notes.append(f"{', '.join(prefix)} dropped with their position rows: ViTDet's features have no prefix tokens")
        pe, grid = sd.get("pos_embed"), tuple(self.patch_embed.grid_size)
        side = math.isqrt(pe.shape[1]) if pe is not None and pe.ndim == 3 else 0
        if self.pos_embed is not None and side and side * side == pe.shape[1] and (side, side) != grid:
            sd["pos_embed"] = self._resample_pos_embed(pe, grid, (side, side), 0)
            log.resampled.append(f"pos_embed: grid {(side, side)} -> {grid} ({self.pos_embed_interp}, as at other inputs)")
        sd = super().checkpoint_filter(sd, log)
        fresh = [k for k, v in self.state_dict().items() if k.rsplit(".", 1)[-1] in ("rel_pos_h", "rel_pos_w") and k not in sd]
        for k in fresh:
            sd[k] = self.state_dict()[k]
        if fresh:
            log.notes.append(f"checkpoint has no relative position tables ({len(fresh)} tensors); they start at zero, "
                             "ViTDet's initialisation")
        return sd

    def _has_prefix_rows(self, rows: int, n_tok: int) -> bool:
        grid = rows - n_tok
        return grid > 0 and (grid == self.patch_embed.num_patches or math.isqrt(grid) ** 2 == grid)

    def attention_stats(self, h: int, w: int) -> list[dict]:
        """Windowed and global blocks on an h x w image: for ``vitkit info``."""
        H, W = self.patch_embed.dynamic_grid(h, w)
        n, ws, heads = H * W, self.window_size, self.blocks[0].attn.num_heads
        padded = -(-H // ws) * ws * -(-W // ws) * ws
        n_glob = len(self.global_attn_indexes)
        out = [dict(module="blocks (windowed)", grid=[H, W], tokens=n, heads=heads, window=[ws, ws],
                    keys_per_query=ws * ws, attn_elems=heads * padded * ws * ws, blocks=len(self.blocks) - n_glob)]
        if n_glob:
            out.append(dict(module="blocks (global)", grid=[H, W], tokens=n, heads=heads, keys_per_query=n,
                            attn_elems=heads * n * n, blocks=n_glob))
        return [s for s in out if s["blocks"]]

    # ------------------------------------------------------------------ token path
    # The reference resamples with plain bicubic (no antialiasing, whose kernel differs even upwards).
    pos_embed_antialias = False

    def _block_inputs(self, ctx: TokenContext):
        # The blocks take the token grid where a plain ViT's take RoPE tables.
        return tuple(ctx.grid), ctx.attention_bias()

    def forward_tokens(self, tokens: torch.Tensor, ctx: TokenContext, keep: torch.Tensor | None = None,
                       token_mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """As the ViT's, on the whole token map: windows need every position, so ``keep`` is refused."""
        if keep is not None:
            raise ValueError("ViTDet runs on the whole token map; keep= (dropping tokens) needs a plain ViT. "
                             "Use token_mask= with a mask token instead")
        return super().forward_tokens(tokens, ctx, token_mask=token_mask, mask_token=mask_token)


# ---------------------------------------------------------------------- variants
PAPER = "Exploring Plain Vision Transformer Backbones for Object Detection (Li et al., 2022)"
_register = register_family("vitdet", ViTDet, paper=PAPER)

# The paper's backbones at 1024 px (window 14 on the 64x64 grid; stochastic depth as its configs).
_PAPER_SIZES = {
    "base": dict(embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, drop_path_rate=0.4),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, drop_path_rate=0.5),
}
for _size, _cfg in _PAPER_SIZES.items():
    _register(
        f"vitdet_{_size}_patch16_1024", dict(_cfg, patch_size=16, window_size=14, num_classes=0), img=1024,
        num_classes=0, crop_pct=1.0,
        notes=f"load plain ViT-{_size[0].upper()} weights, e.g. pretrained='timm/vit_{_size}_patch16_224.mae' where published",
    )
# Smaller inputs: window 7 splits the 14x14 grid of a 224 px image into 2x2 windows.
for _size, _cfg in {"tiny": dict(embed_dim=192, depth=12, num_heads=3),
                    "small": dict(embed_dim=384, depth=12, num_heads=6)}.items():
    _register(
        f"vitdet_{_size}_patch16_224", dict(_cfg, patch_size=16, window_size=7, num_classes=0), num_classes=0,
        crop_pct=1.0, notes="window 7 at 224 px; loads plain ViT weights of the same size",
    )
_register(
    "test_vitdet", dict(embed_dim=64, depth=4, num_heads=2, patch_size=8, window_size=2, global_attn_indexes=(1, 3)),
    img=32, crop_pct=1.0, paper="tiny test variant", notes="for tests; not a real model",
)

__all__ = ["ViTDet", "ViTDetAttention", "decomposed_rel_pos", "global_blocks", "rel_pos_table"]
