"""CaiT: Going deeper with Image Transformers (Touvron et al., 2021).

Two ideas make deep ViTs train: LayerScale (each residual branch is multiplied by a learned
per-channel ``gamma``, initialised small) and a late class-attention stage (the patch tokens
are processed by self-attention blocks without a class token; only then do two
class-attention blocks let the class token read from the frozen patch tokens). The patch
blocks use talking-heads attention: the heads are mixed by learned linear maps before and
after the softmax. Parameter names follow the common checkpoint layout (``blocks.N.gamma_1``,
``blocks.N.attn.proj_l``, ``blocks_token_only.N.attn.q``, ``cls_token``, ``pos_embed``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import DropPath, Mlp, PatchEmbed
from ._base import Backbone, Point, trunc_normal_linear
from ._registry import register_family


class TalkingHeadAttention(nn.Module):
    """Self-attention whose heads are mixed by ``proj_l`` on the logits and ``proj_w`` on the weights.

    The head mixing sits between the matmuls, so this path cannot use the fused SDPA kernel.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_l = nn.Linear(num_heads, num_heads)
        self.proj_w = nn.Linear(num_heads, num_heads)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # mix heads: via (B, N, N, heads)
        attn = attn.softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, C)  # (B, N, heads * head_dim)
        return self.proj_drop(self.proj(x))


class ClassAttention(nn.Module):
    """Attention with the class token as the only query over [class token, patch tokens]."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop_p = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1 + N, C), class token first -> (B, 1, C) update for the class token."""
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x[:, :1]).reshape(B, 1, h, C // h).transpose(1, 2)  # (B, heads, 1, head_dim)
        k = self.k(x).reshape(B, N, h, C // h).transpose(1, 2)  # (B, heads, N, head_dim)
        v = self.v(x).reshape(B, N, h, C // h).transpose(1, 2)
        x_cls = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop_p if self.training else 0.0)
        return self.proj_drop(self.proj(x_cls.transpose(1, 2).reshape(B, 1, C)))


class LayerScaleBlock(nn.Module):
    """Pre-norm self-attention block with LayerScale on the patch tokens:
    x + drop_path(gamma_1 * attn(norm1(x))), then the same for the MLP with gamma_2."""

    def __init__(
        self, dim: int, num_heads: int, attn_layer: type[nn.Module] = TalkingHeadAttention, mlp_ratio: float = 4.0,
        qkv_bias: bool = True, init_values: float = 1e-5, proj_drop: float = 0.0, attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn_layer(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        # Bare parameters, not LayerScale modules, so the checkpoint keys stay ``gamma_1``/``gamma_2``.
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class ClassAttentionBlock(LayerScaleBlock):
    """The LayerScale block around ``ClassAttention``: only the class token is updated.

    Input u = [class token, patch tokens] (B, 1 + N, D); output the new class token (B, 1, D).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, init_values: float = 1e-5):
        super().__init__(dim, num_heads, ClassAttention, mlp_ratio, qkv_bias, init_values)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        x_cls = u[:, :1] + self.drop_path(self.gamma_1 * self.attn(self.norm1(u)))
        return x_cls + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x_cls)))


class CaiT(Backbone):
    """CaiT backbone with a classification head.

    ``forward_features`` returns (B, 1 + N, D): the class token, then the patch tokens as the
    last patch block left them, all through the final norm. The position embedding covers the
    patch tokens only (the class token joins after the patch blocks) and is resampled for
    other input sizes.
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
        qkv_bias: bool = True,
        init_values: float = 1e-5,
        depth_token_only: int = 2,
        mlp_ratio_token_only: float = 4.0,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = self.embed_dim = embed_dim

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # CaiT drops every block with the same rate (not a linear ramp): all blocks are equally deep residuals.
        self.blocks = nn.Sequential(*[
            LayerScaleBlock(
                embed_dim, num_heads, TalkingHeadAttention, mlp_ratio, qkv_bias, init_values, proj_drop_rate,
                attn_drop_rate, drop_path_rate,
            )
            for _ in range(depth)
        ])
        self.blocks_token_only = nn.ModuleList([
            ClassAttentionBlock(embed_dim, num_heads, mlp_ratio_token_only, qkv_bias, init_values)
            for _ in range(depth_token_only)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_classifier(num_classes, drop_rate)
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=self.patch_embed.patch_size[0], module=f"blocks.{i}") for i in range(depth)
        ]
        init_token_weights(self)

    # ------------------------------------------------------------------ backbone API
    def group_matcher(self, coarse: bool = False) -> dict:
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None)],
            "class_attention": [(r"^blocks_token_only\.(\d+)", None), (r"^norm", (99999,))],
        }

    # ------------------------------------------------------------------ forward
    def _class_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, D) -> [class token, patch tokens] (B, 1 + N, D)."""
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for blk in self.blocks_token_only:
            cls = blk(torch.cat([cls, x], dim=1))  # (B, 1 + N, D) -> (B, 1, D)
        return torch.cat([cls, x], dim=1)

    def _intermediates(self, x: torch.Tensor, take, norm: bool) -> tuple[torch.Tensor, list[Point]]:
        """Features (B, 1 + N, D), and the patch tokens after the patch blocks in ``take``."""
        x, grid = self._embed_patches(x)  # (B, N, D)
        x, feats = self._run_blocks(self.blocks, x, grid, take, norm)
        return self.norm(self._class_attention(x)), feats


def init_token_weights(model: nn.Module) -> None:
    """Truncated-normal tokens, position embedding and linears (std 0.02), zero biases."""
    for name in ("pos_embed", "cls_token"):
        nn.init.trunc_normal_(getattr(model, name), std=0.02)
    for m in model.modules():
        trunc_normal_linear(m)


# ---------------------------------------------------------------------- variants
CAIT_PAPER = "Going deeper with Image Transformers (Touvron et al., 2021)"
_VARIANTS = {
    # name: (embed_dim, depth, heads, init_values, image size)
    "cait_xxs24_224": (192, 24, 4, 1e-5, 224),
    "cait_xxs24_384": (192, 24, 4, 1e-5, 384),
    "cait_xxs36_224": (192, 36, 4, 1e-5, 224),
    "cait_xxs36_384": (192, 36, 4, 1e-5, 384),
    "cait_xs24_384": (288, 24, 6, 1e-5, 384),
    "cait_s24_224": (384, 24, 8, 1e-5, 224),
    "cait_s24_384": (384, 24, 8, 1e-5, 384),
    "cait_s36_384": (384, 36, 8, 1e-6, 384),
    "cait_m36_384": (768, 36, 16, 1e-6, 384),
    "cait_m48_448": (768, 48, 16, 1e-6, 448),
}


_register = register_family("cait", CaiT)


for _name, (_dim, _depth, _heads, _init, _img) in _VARIANTS.items():
    _register(
        _name, dict(patch_size=16, embed_dim=_dim, depth=_depth, num_heads=_heads, init_values=_init), img=_img,
        crop_pct=1.0, paper=CAIT_PAPER, hub_id=f"timm/{_name}.fb_dist_in1k",
    )

_register(
    "test_cait", dict(patch_size=8, embed_dim=64, depth=2, num_heads=2, init_values=1e-1, depth_token_only=1), img=32,
    crop_pct=1.0, paper="tiny test variant", notes="for tests; not a real model",
)

__all__ = ["CaiT"]
