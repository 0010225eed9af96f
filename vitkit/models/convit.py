"""ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases (d'Ascoli et al., 2021).

The first ``local_up_to_layer`` blocks use gated positional self-attention (GPSA): each head
mixes content attention softmax(q k^T) with positional attention softmax(pos_proj(r_ij)),
where r_ij = (dx, dy, dx^2 + dy^2) is the offset between patches, through a learned gate
sigmoid(gating_param). The positional part is initialised so each head attends to one
neighbour offset of a sqrt(heads) x sqrt(heads) kernel (a convolution); training may open the
gate to content attention where it helps. The class token joins after the GPSA blocks; the
remaining blocks are plain self-attention. Parameter names follow the common checkpoint
layout (``blocks.N.attn.qk``, ``.attn.pos_proj``, ``.attn.gating_param``, ``pos_embed``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import Block, DropPath, Mlp, PatchEmbed
from ._base import Backbone, Point
from ._registry import register_family
from .cait import init_token_weights


def relative_offsets(grid: tuple[int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, N, N, 3) table of (dx, dy, dx^2 + dy^2) from patch i to patch j, row-major over ``grid``."""
    H, W = grid
    rows = torch.arange(H, device=device, dtype=dtype).repeat_interleave(W)  # (N,)
    cols = torch.arange(W, device=device, dtype=dtype).repeat(H)
    dx = cols[None, :] - cols[:, None]  # (N, N)
    dy = rows[None, :] - rows[:, None]
    return torch.stack([dx, dy, dx**2 + dy**2], dim=-1)[None]


class GPSA(nn.Module):
    """Gated positional self-attention over patch tokens (no prefix tokens)."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0,
        locality_strength: float = 1.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.locality_strength = locality_strength
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, num_heads)
        self.proj_drop = nn.Dropout(proj_drop)
        self.gating_param = nn.Parameter(torch.ones(num_heads))

    @torch.no_grad()
    def local_init(self) -> None:
        """Make the block a convolution: v is the identity, head h attends to one offset of a k x k kernel.

        Positional logits are -strength * |r - offset_h|^2 up to a per-query constant, so with a
        large strength each head's softmax picks the patch at its offset.
        """
        self.v.weight.copy_(torch.eye(self.v.weight.shape[0]))
        k = int(self.num_heads**0.5)
        center = (k - 1) / 2 if k % 2 == 0 else k // 2
        for h1 in range(k):
            for h2 in range(k):
                head = h1 + k * h2
                self.pos_proj.weight[head] = torch.tensor([2 * (h2 - center), 2 * (h1 - center), -1.0])
        self.pos_proj.weight.mul_(self.locality_strength)

    def attention(self, x: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens and (1, N, N, 3) offsets -> (B, heads, N, N) gated attention weights."""
        B, N, C = x.shape
        qk = self.qk(x).reshape(B, N, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = qk.unbind(0)  # each (B, heads, N, head_dim)
        content = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        position = self.pos_proj(rel.to(x.dtype)).permute(0, 3, 1, 2).softmax(dim=-1)  # (1, heads, N, N)
        gate = torch.sigmoid(self.gating_param).view(1, -1, 1, 1)
        attn = (1.0 - gate) * content + gate * position
        return attn / attn.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        v = self.v(x).reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, heads, N, head_dim)
        x = (self.attn_drop(self.attention(x, rel)) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class GPSABlock(nn.Module):
    """Pre-norm block around GPSA: x + drop_path(attn(norm1(x), rel)), then the MLP."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, proj_drop: float = 0.0,
        attn_drop: float = 0.0, drop_path: float = 0.0, locality_strength: float = 1.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = GPSA(dim, num_heads, qkv_bias, attn_drop, proj_drop, locality_strength)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), rel))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConViT(Backbone):
    """ConViT backbone with a classification head.

    ``forward_features`` returns (B, 1 + N, D), class token first, through the final norm.
    The position embedding covers the patch tokens only and is resampled for other sizes;
    GPSA offsets are computed for the input's grid.
    """

    no_embed_class = True  # the position embedding has no class-token row
    num_prefix_tokens = 1
    no_weight_decay_keys = ("pos_embed", "cls_token")
    classifier_init_std = None

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        local_up_to_layer: int = 10,
        locality_strength: float = 1.0,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if not 0 <= local_up_to_layer < depth:
            raise ValueError(
                f"local_up_to_layer {local_up_to_layer} must be in [0, depth={depth}): the class token joins "
                "after the GPSA blocks, so at least one plain block must follow them"
            )
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = self.embed_dim = embed_dim
        self.local_up_to_layer = local_up_to_layer

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        self.blocks = nn.ModuleList([
            GPSABlock(
                embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, dpr[i], locality_strength
            )
            if i < local_up_to_layer
            else Block(
                embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[i],
            )
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_classifier(num_classes, drop_rate)
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=self.patch_embed.patch_size[0], module=f"blocks.{i}") for i in range(depth)
        ]
        self._init_weights()

    def _init_weights(self) -> None:
        init_token_weights(self)
        for m in self.modules():
            if isinstance(m, GPSA):
                m.local_init()

    # ------------------------------------------------------------------ backbone API
    def group_matcher(self, coarse: bool = False) -> dict:
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    # ------------------------------------------------------------------ forward
    def _intermediates(self, x: torch.Tensor, take, norm: bool) -> tuple[torch.Tensor, list[Point]]:
        """Embed, run every block (the class token joins after the GPSA ones), collect patch tokens at ``take``."""
        x, grid = self._embed_patches(x)  # (B, N, D)
        rel = relative_offsets(grid, x.device)
        feats = []
        for i, blk in enumerate(self.blocks):
            if i == self.local_up_to_layer:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
            extra = (rel,) if i < self.local_up_to_layer else ()
            x = self.checkpointed(blk, x, *extra)
            if i in take:
                feats.append(Point(self.norm(x) if norm else x, grid, int(i >= self.local_up_to_layer)))
        return self.norm(x), feats


# ---------------------------------------------------------------------- variants
CONVIT_PAPER = "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases (d'Ascoli et al., 2021)"


_register = register_family("convit", ConViT)


# 48 channels per head; the head count is a square so the local init tiles a k x k kernel.
for _size, _heads in (("tiny", 4), ("small", 9), ("base", 16)):
    _register(
        f"convit_{_size}", dict(embed_dim=48 * _heads, num_heads=_heads, local_up_to_layer=10, locality_strength=1.0),
        crop_pct=0.875, paper=CONVIT_PAPER, hub_id=f"timm/convit_{_size}.fb_in1k",
    )

_register(
    "test_convit", dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, local_up_to_layer=1), img=32,
    crop_pct=1.0, paper="tiny test variant", notes="for tests; not a real model",
)

__all__ = ["ConViT"]
