"""Swin Transformer v1 and v2: hierarchical stages of shifted-window attention with patch merging.

v1 (Liu et al., 2021): 4x4 patch embedding, window attention with a learned relative position
bias table, cyclic shift with a mask in every second block, 2x2 patch merging between stages.
v2 (Liu et al., 2022): scaled cosine attention with a learned per-head temperature, the norm
after each residual branch (res-post-norm), and a continuous position bias from a small MLP over
log-spaced offsets, so weights move between window sizes without resampling.

Any input size works: the patch embedding and the windows pad to whole patches and windows
(padding is masked out as keys), and a stage whose map is smaller than the window attends over
the whole map without a shift (:func:`vitkit.layers.windows.window_and_shift`). Parameter names
follow the common Swin checkpoint layout (``layers.N.blocks.M.attn.qkv``,
``relative_position_bias_table``, ``layers.N.downsample.reduction``).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Attention, AttentionCore, DropPath, Mlp, PatchEmbed, TokenContext
from ..layers.rel_pos import log_spaced_coords, relative_position_index, resample_rel_pos_table, table_bias
from ..layers.windows import window_and_shift, window_mask, window_partition, window_reverse
from ._base import StageBackbone, check_image, trunc_normal_linear
from ._registry import register_family


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _window_bias(bias: torch.Tensor, mask: torch.Tensor | None, batch_windows: int) -> torch.Tensor:
    """(heads, N, N) position bias + (nW, N, N) window mask -> a bias for (B * nW) windows."""
    if mask is None:
        return bias[None]  # (1, heads, N, N), broadcast over windows
    nW = mask.shape[0]
    return (bias[None] + mask[:, None]).repeat(batch_windows // nW, 1, 1, 1)  # (B * nW, heads, N, N)


class WindowAttention(Attention):
    """Attention inside a window with a learned bias per head and relative offset (Swin v1).

    The bias (and the shift mask) reach the fused kernel as ``attn_bias``; capture works as
    for every :class:`Attention`.
    """

    def __init__(self, dim: int, num_heads: int, window_size: tuple[int, int], qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.window_size = tuple(window_size)
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)

    def forward(self, x: torch.Tensor, window: tuple[int, int], mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B * nW, N, C) window tokens; mask: (nW, N, N) or None."""
        bias = table_bias(self.relative_position_bias_table, window, self.window_size, self.relative_position_index)
        return super().forward(x, attn_bias=_window_bias(bias, mask, x.shape[0]))


class CosineWindowAttention(AttentionCore):
    """Scaled cosine attention with a continuous position bias (Swin v2).

    logits = cos(q, k) * exp(min(logit_scale, log 100)) + 16 * sigmoid(cpb_mlp(log-spaced offset)).
    The temperature is folded into q so the fused kernel runs with scale 1.
    """

    def __init__(self, dim: int, num_heads: int, window_size: tuple[int, int], qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, pretrained_window_size: tuple[int, int] = (0, 0)):
        super().__init__(attn_drop)
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = tuple(window_size)
        # Offsets are measured in units of the window the bias MLP was trained at.
        self.norm_window = tuple(pretrained_window_size) if pretrained_window_size[0] > 0 else self.window_size
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        # Keys get no bias: it would add the same logit to every key of a query.
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self, window: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(heads, N, N) continuous position bias for a window of that size."""
        coords = log_spaced_coords(window, self.norm_window).to(device=device, dtype=dtype)
        table = self.cpb_mlp(coords).view(-1, self.num_heads)  # ((2Wh-1)*(2Ww-1), heads)
        return 16 * torch.sigmoid(table_bias(table, window, window))

    def forward(self, x: torch.Tensor, window: tuple[int, int], mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B * nW, heads, N, head_dim)
        temperature = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()  # (heads, 1, 1)
        q = F.normalize(q, dim=-1) * temperature
        k = F.normalize(k, dim=-1)
        pos = self.position_bias(window, x.device, q.dtype)
        x = self.attend(q, k, v, _window_bias(pos, mask, B), scale=1.0)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B * nW, N, heads * head_dim)
        return self.proj_drop(self.proj(x))


class SwinBlock(nn.Module):
    """(Shifted) window attention + MLP on a (B, H, W, C) map.

    pre-norm (v1):       x = x + drop_path(attn(norm1(x)));  x = x + drop_path(mlp(norm2(x)))
    res-post-norm (v2):  x = x + drop_path(norm1(attn(x)));  x = x + drop_path(norm2(mlp(x)))
    """

    def __init__(self, dim: int, num_heads: int, window_size: tuple[int, int], shifted: bool,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, version: int = 1, pretrained_window_size: tuple[int, int] = (0, 0)):
        super().__init__()
        self.window_size = tuple(window_size)
        self.shift_size = tuple(w // 2 for w in window_size) if shifted else (0, 0)
        self.res_post_norm = version == 2
        self.norm1 = nn.LayerNorm(dim)
        if version == 2:
            self.attn = CosineWindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop,
                                              pretrained_window_size)
        else:
            self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        window, shift = window_and_shift((H, W), self.window_size, self.shift_size)
        # Pad to whole windows first, then roll the padded map, so the mask's regions are exact.
        pad_h, pad_w = (-H) % window[0], (-W) % window[1]
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = window_partition(x, window)  # (B * nW, wh * ww, C)
        windows = self.attn(windows, window, window_mask((H, W), window, shift, x.device))
        x = window_reverse(windows, window, Hp, Wp)  # (B, Hp, Wp, C)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :H, :W].contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.res_post_norm:
            x = x + self.drop_path1(self.norm1(self._attn(x)))
            return x + self.drop_path2(self.norm2(self.mlp(x)))
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens -> one token of ``out_dim`` channels (odd sizes are zero-padded).

    v1 normalises the 4C concatenation before the linear reduction, v2 normalises after it.
    """

    def __init__(self, dim: int, out_dim: int, version: int = 1):
        super().__init__()
        self.norm_after = version == 2
        self.norm = nn.LayerNorm(out_dim if self.norm_after else 4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        H, W = x.shape[1], x.shape[2]
        # (B, H/2, W/2, 4C), neighbours ordered (0,0), (1,0), (0,1), (1,1)
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        if self.norm_after:
            return self.norm(self.reduction(x))
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Optional patch merging, then ``depth`` blocks alternating plain and shifted windows."""

    def __init__(self, dim: int, out_dim: int, depth: int, downsample: bool, drop_path: list[float], **block):
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim, block.get("version", 1)) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            SwinBlock(out_dim, shifted=i % 2 == 1, drop_path=drop_path[i], **block) for i in range(depth)
        ])


class SwinTransformer(StageBackbone):
    """Swin Transformer (v1 or v2) backbone with a classification head.

    ``forward_features`` returns the normalised last-stage tokens (B, H/32 * W/32, C) in
    row-major order (``num_prefix_tokens`` is 0); ``forward_intermediates`` returns the four
    stage maps at strides 4, 8, 16, 32 that ``feature_info`` lists.
    """

    stage_attr = "layers"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int | tuple[int, int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        version: int = 1,
        pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0),
    ):
        super().__init__()
        if version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {version}")
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} must have one entry per stage")
        dims = [embed_dim * 2**i for i in range(len(depths))]
        for d, h in zip(dims, num_heads, strict=True):
            if h < 1 or d % h:
                raise ValueError(f"stage width {d} is not divisible by num_heads {h}")
        self.window_size = _pair(window_size)
        self.version = version
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = dims[-1]
        self.embed_dim = embed_dim
        # Dynamic padding: any image size tiles into 4x4 patches.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm_layer=nn.LayerNorm,
                                      dynamic_pad=True)
        self.patch_size = self.patch_embed.patch_size
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # stochastic depth grows with depth
        stages, start = [], 0
        for i, depth in enumerate(depths):
            stages.append(SwinStage(
                dims[max(i - 1, 0)], dims[i], depth, downsample=i > 0, drop_path=dpr[start:start + depth],
                num_heads=num_heads[i], window_size=self.window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, version=version,
                pretrained_window_size=_pair(pretrained_window_sizes[i]),
            ))
            start += depth
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.init_classifier(num_classes, drop_rate)
        stride = self.patch_size[0]
        self.feature_info = [
            dict(num_chs=d, reduction=stride * 2**i, module=f"layers.{i}") for i, d in enumerate(dims)
        ]
        self.apply(trunc_normal_linear)


    # ------------------------------------------------------------------ backbone API
    no_weight_decay_keys = ("relative_position_bias_table", "logit_scale", "cpb_mlp")
    recomputed_keys = ("relative_position_index", "attn_mask", "relative_coords_table")

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor], log) -> dict[str, torch.Tensor]:
        """timm's Swin checkpoints -> this model.

        The classifier timm stores as ``head.fc`` is ``head`` here; checkpoints in the original
        layout (patch merging at the end of a stage) move it to the start of the next; learned
        bias tables are resampled to each layer's window (e.g. 7 -> 12 for 384 px fine-tuning).
        """
        sd = super().checkpoint_filter(state_dict, log)
        old_layout = "layers.0.downsample.reduction.weight" in sd
        out = {}
        for k, v in sd.items():
            if old_layout:
                k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
            if k.startswith("head.fc."):
                k = "head." + k[len("head.fc."):]
            out[k] = v
        if old_layout:
            log.notes.append("original Swin layout: patch merging moved from the end of stage N to the start of N+1")
        target = self.state_dict()
        for k in [k for k in out if k.endswith("relative_position_bias_table")]:
            if k not in target or out[k].shape == target[k].shape:
                continue
            new_window = tuple(self.get_submodule(k.rsplit(".", 1)[0]).window_size)
            side = math.isqrt(out[k].shape[0])
            if side * side != out[k].shape[0] or side % 2 == 0:
                raise ValueError(f"{k} has {out[k].shape[0]} rows, not a (2w-1)^2 table of a square window")
            old_window = ((side + 1) // 2,) * 2
            out[k] = resample_rel_pos_table(out[k], old_window, new_window)
            log.resampled.append(f"{k}: window {old_window} -> {new_window}")
        return out

    def attention_stats(self, h: int, w: int) -> list[dict]:
        """What attention costs on an h x w image, per stage: for ``vitkit info``."""
        H, W = -(-h // self.patch_size[0]), -(-w // self.patch_size[1])
        out = []
        for i, stage in enumerate(self.layers):
            if i > 0:
                H, W = -(-H // 2), -(-W // 2)
            (wh, ww), _ = window_and_shift((H, W), self.window_size, (0, 0))
            padded = -(-H // wh) * wh * -(-W // ww) * ww
            heads = stage.blocks[0].attn.num_heads
            out.append(dict(module=f"layers.{i}", grid=[H, W], tokens=H * W, heads=heads, window=[wh, ww],
                            keys_per_query=wh * ww, attn_elems=heads * padded * wh * ww, blocks=len(stage.blocks)))
        return out

    # ------------------------------------------------------------------ token path
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, TokenContext]:
        """(B, C, H, W) -> (B, H/4 * W/4, C) patch tokens (normalised) and their context."""
        check_image(x, self.in_chans)
        grid = self.patch_embed.dynamic_grid(x.shape[2], x.shape[3])
        x = self.patch_embed(x)
        positions = torch.arange(x.shape[1], device=x.device)[None]
        return x, TokenContext(grid, 0, positions)

    def _stages(self, tokens: torch.Tensor, ctx: TokenContext):
        """Yield each stage's (B, H, W, C) output map."""
        B, _, C = tokens.shape
        x = tokens.reshape(B, ctx.grid[0], ctx.grid[1], C)
        for stage in self.layers:
            x = stage.downsample(x)
            for blk in stage.blocks:
                x = self.checkpointed(blk, x)
            yield x

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


SWIN_PAPER = "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows (Liu et al., 2021)"
SWINV2_PAPER = "Swin Transformer V2: Scaling Up Capacity and Resolution (Liu et al., 2022)"
_register = register_family("swin", SwinTransformer, paper=SWIN_PAPER)
_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
for _size, _cfg in (("tiny", _T), ("small", _S), ("base", _B)):
    _register(f"swin_{_size}_patch4_window7_224", dict(_cfg, patch_size=4, window_size=7),
              hub_id=f"timm/swin_{_size}_patch4_window7_224.ms_in1k")
_register("swinv2_tiny_window8_256", dict(_T, patch_size=4, window_size=8, version=2), img=256, crop_pct=0.9,
          paper=SWINV2_PAPER, hub_id="timm/swinv2_tiny_window8_256.ms_in1k")

# Tiny variants for fast tests: patch 2 keeps every stage at 2x2 tokens or more at 32 px, so the
# last stage's attention (and its position bias) still learns in the registry tests.
_TEST = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), patch_size=2, window_size=4)
_TEST_CARD = dict(img=32, crop_pct=1.0, paper="tiny test variant", notes="for tests; not a real model")
_register("test_swin", dict(_TEST), **_TEST_CARD)
_register("test_swinv2", dict(_TEST, version=2), **_TEST_CARD)

__all__ = ["SwinTransformer"]
