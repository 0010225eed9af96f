"""EfficientFormer (v1): PoolFormer-style conv stages, attention only at the end.

The design (Li et al., 2022) keeps inference fast on phones: a stride-4 conv stem, stages of
"4D" MetaBlocks on (B, C, H, W) maps whose token mixer is 3x3 average pooling minus the input
and whose MLP is 1x1 convs with BatchNorm, a strided conv between stages, and in the last
stage the map is flattened to tokens for a few "3D" MetaBlocks with multi-head attention
(offset bias instead of position embeddings) and LayerNorm. Every branch has LayerScale.

Parameter names follow timm's EfficientFormer (``stem.conv1``, ``stages.N.downsample.conv``,
``stages.N.blocks.M.mlp.fc1``, ``token_mixer.attention_biases``, ``norm``, ``head``,
``head_dist``). timm's checkpoints also store ``attention_bias_idxs``, an index that vitkit
computes instead; the converter drops it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import DropPath, LayerScale, Mlp
from ..layers.offset_bias import OffsetBias
from ._base import Backbone, Point, check_image, checkpoint_if, map_to_tokens
from ._registry import register_family


class Attention(OffsetBias):
    """Multi-head attention over (B, N, C) tokens with offset biases; values ``attn_ratio`` x wider than keys."""

    def __init__(self, dim: int, key_dim: int = 32, num_heads: int = 8, attn_ratio: float = 4.0,
                 resolution: tuple[int, int] = (7, 7)):
        super().__init__(num_heads, resolution)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Linear(num_heads * self.val_dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, _ = x.shape
        # Each head's slice is laid out [q | k | v].
        qkv = self.qkv(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)  # (B, heads, N, 2*key_dim + val_dim)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.offset_bias(grid).to(q.dtype))
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))


class LayerScale2d(LayerScale):
    """LayerScale on (B, C, H, W) maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma[:, None, None]


class Pooling(nn.Module):
    """avgpool3x3(x) - x: mixes neighbours; the block's residual adds x back."""

    def __init__(self, pool_size: int = 3):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) - x


class ConvMlpWithNorm(nn.Module):
    """1x1 conv -> BN -> GELU -> 1x1 conv -> BN on maps."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.norm1(self.fc1(x))))
        return self.drop(self.norm2(self.fc2(x)))


class MetaBlock2d(nn.Module):
    """Map block: x + ls1(pool(x) - x); x + ls2(conv mlp(x))."""

    def __init__(self, dim: int, mlp_ratio: float, drop: float, drop_path: float, ls_init: float):
        super().__init__()
        self.token_mixer = Pooling()
        self.ls1 = LayerScale2d(dim, ls_init)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = ConvMlpWithNorm(dim, int(dim * mlp_ratio), drop)
        self.ls2 = LayerScale2d(dim, ls_init)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.token_mixer(x)))
        return x + self.drop_path2(self.ls2(self.mlp(x)))


class MetaBlock1d(nn.Module):
    """Token block: pre-norm attention and MLP, each with LayerScale."""

    def __init__(self, dim: int, mlp_ratio: float, drop: float, drop_path: float, ls_init: float, attn: dict):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixer = Attention(dim, **attn)
        self.ls1 = LayerScale(dim, ls_init)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls2 = LayerScale(dim, ls_init)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.token_mixer(self.norm1(x), grid)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class Flat(nn.Module):
    """(B, C, H, W) map -> (B, H*W, C) tokens, between the 4D and the 3D blocks."""

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return map_to_tokens(x)


class Downsample(nn.Module):
    """Strided 3x3 conv + BN between stages."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class EfficientFormerStage(nn.Module):
    def __init__(self, dim, dim_out, depth, downsample, num_vit, mlp_ratio, drop, dpr, ls_init, attn):
        super().__init__()
        self.downsample = Downsample(dim, dim_out) if downsample else nn.Identity()
        blocks = []
        if num_vit >= depth:
            blocks.append(Flat())
        for i in range(depth):
            remaining = depth - i - 1
            if num_vit > remaining:
                blocks.append(MetaBlock1d(dim_out, mlp_ratio, drop, dpr[i], ls_init, attn))
            else:
                blocks.append(MetaBlock2d(dim_out, mlp_ratio, drop, dpr[i], ls_init))
                if num_vit and num_vit == remaining:
                    blocks.append(Flat())
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> a map, or (B, N, C) tokens when the stage has 3D blocks."""
        x = self.downsample(x)
        grid = (x.shape[2], x.shape[3])
        for blk in self.blocks:
            x = checkpoint_if(self.grad_checkpointing, blk, x, grid)
        return x


class EfficientFormer(Backbone):
    """EfficientFormer backbone: stride-4 stem, stages at strides 4/8/16/32, final LayerNorm on
    the last stage's tokens, average pooling and two linear heads (classifier and distillation:
    both logits in training, their mean in eval).

    num_vit: how many of the last stage's blocks are attention blocks.
    attn_key_dim / attn_heads: the attention's key width and head count.
    """

    pools = ("avg", "")
    no_weight_decay_keys = ("attention_biases",)
    recomputed_keys = ("attention_bias_idxs",)  # timm saves the bias index; vitkit computes it per grid

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: tuple[int, ...] = (3, 2, 6, 4),
        embed_dims: tuple[int, ...] = (48, 96, 224, 448),
        num_vit: int = 1,
        mlp_ratio: float = 4.0,
        attn_key_dim: int = 32,
        attn_heads: int = 8,
        layer_scale_init_value: float = 1e-5,
        distilled: bool = True,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if len(depths) != len(embed_dims):
            raise ValueError(f"depths {depths} and embed_dims {embed_dims} need one entry per stage")
        if num_vit < 1:
            raise ValueError(f"num_vit must be >= 1 (the last stage ends in attention blocks), got {num_vit}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        n = len(depths)
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = embed_dims[-1]
        self.distilled = distilled

        self.stem = nn.Sequential()
        self.stem.add_module("conv1", nn.Conv2d(in_chans, embed_dims[0] // 2, 3, stride=2, padding=1))
        self.stem.add_module("norm1", nn.BatchNorm2d(embed_dims[0] // 2))
        self.stem.add_module("act1", nn.ReLU())
        self.stem.add_module("conv2", nn.Conv2d(embed_dims[0] // 2, embed_dims[0], 3, stride=2, padding=1))
        self.stem.add_module("norm2", nn.BatchNorm2d(embed_dims[0]))
        self.stem.add_module("act2", nn.ReLU())
        # The bias table covers the last stage's grid at the build size.
        last = 2 ** (n + 1)
        attn = dict(key_dim=attn_key_dim, num_heads=attn_heads, resolution=(-(-img_size[0] // last), -(-img_size[1] // last)))
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, start, prev = [], 0, embed_dims[0]
        self.feature_info = []
        for i in range(n):
            stages.append(EfficientFormerStage(
                prev, embed_dims[i], depths[i], i > 0, num_vit if i == n - 1 else 0, mlp_ratio, proj_drop_rate,
                dpr[start:start + depths[i]], layer_scale_init_value, attn,
            ))
            start += depths[i]
            prev = embed_dims[i]
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=2 ** (i + 2), module=f"stages.{i}"))
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.init_classifier(num_classes, drop_rate, distilled)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ backbone API
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem", "blocks": [(r"^stages\.(\d+)", None), (r"^norm", (99999,))]}

    # ------------------------------------------------------------------ forward
    def _intermediates(self, x: torch.Tensor, take, norm: bool) -> tuple[torch.Tensor, list[Point]]:
        """Normalised last-stage tokens (B, N, C_last) (stride 32), and the stages in ``take``:
        maps, the last one as tokens (``norm`` applies the final LayerNorm to it, the only stage it
        was trained on)."""
        check_image(x, self.in_chans)
        x = self.stem(x)
        last = len(self.stages) - 1
        feats = []
        for i, stage in enumerate(self.stages):
            grid = (x.shape[2], x.shape[3]) if i == 0 else ((x.shape[2] + 1) // 2, (x.shape[3] + 1) // 2)
            x = stage(x)
            if i in take:
                feats.append(Point(self.norm(x) if norm else x, grid) if i == last else Point(x))
        return self.norm(x), feats


# ---------------------------------------------------------------------- variants
EFFICIENTFORMER_PAPER = "EfficientFormer: Vision Transformers at MobileNet Speed (Li et al., 2022)"

_register = register_family("efficientformer", EfficientFormer)
_register(
    "efficientformer_l1", dict(depths=(3, 2, 6, 4), embed_dims=(48, 96, 224, 448), num_vit=1), crop_pct=0.95,
    paper=EFFICIENTFORMER_PAPER, hub_id="timm/efficientformer_l1.snap_dist_in1k", notes="distilled: two heads",
)
# Two stages (strides 4, 8) so the last map is stride 8 on 32 px inputs.
_register(
    "test_efficientformer", dict(depths=(1, 2), embed_dims=(16, 32), num_vit=1, attn_key_dim=8, attn_heads=2),
    img=32, crop_pct=1.0, paper="tiny test variant", notes="for tests; not a real model",
)

__all__ = ["EfficientFormer"]
