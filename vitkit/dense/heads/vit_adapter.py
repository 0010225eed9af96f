"""ViT-Adapter (Chen et al., 2023): a convolutional spatial prior and four interactions that feed
it into a plain ViT and read multi-scale features back out, for dense prediction.

The spatial prior module (a conv stem, then strided convs) gives maps at strides 4, 8, 16 and
32; those at 8/16/32 become one token sequence ``c``. The ViT's blocks run in four groups;
before each, an injector adds cross-attention from the ViT tokens to ``c`` (scaled by a
learnable ``gamma`` that starts at 0, so the pretrained ViT is untouched at initialisation);
after each, an extractor updates ``c`` by cross-attention to the ViT tokens plus a ConvFFN (the
last interaction has two more extractors). The output is four maps at strides 4 (upsampled
from 8 plus the stem's map), 8, 16, 32, each with the ViT's map added and a BatchNorm.

Deviation from the reference: its multi-scale deformable attention is replaced by plain
multi-head cross-attention (``attn="cross"``, the only option here; ``n_points`` and
``deform_ratio`` have no counterpart). The other defaults are the reference's: 6 attention
heads (ViT-T/S; pass ``num_heads`` for wider models), ``cffn_ratio`` 0.25, injector gamma 0,
ConvFFN on, interactions at the quarters of the depth, 64 stem channels, and UperNet as the
decoder of the four maps (``decoder="upernet"``, the paper's; ``"minimal"`` is a light one).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from ...errors import ConfigError
from ...layers import AttentionCore, DropPath
from ..layers import ConvBNReLU, conv_norm, resize, seg_classifier
from ..registry import register_head
from .upernet import UperNetHead

DECODERS = ("upernet", "minimal")


def _down(cin: int, cout: int) -> nn.Sequential:
    # ConvBNReLU keeps the size; the spatial prior's downsampling units are the same at stride 2.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), conv_norm("bn", cout), nn.ReLU(inplace=True))


class SpatialPriorModule(nn.Module):
    """Conv stem (stride 4) and three stride-2 convs; 1x1 projections to the ViT's width."""

    def __init__(self, in_chans: int, inplanes: int, dim: int):
        super().__init__()
        self.stem = nn.Sequential(_down(in_chans, inplanes), ConvBNReLU(inplanes, inplanes), ConvBNReLU(inplanes, inplanes),
                                  nn.MaxPool2d(3, 2, 1))
        self.conv2 = _down(inplanes, 2 * inplanes)
        self.conv3 = _down(2 * inplanes, 4 * inplanes)
        self.conv4 = _down(4 * inplanes, 4 * inplanes)
        self.fc1, self.fc2 = nn.Conv2d(inplanes, dim, 1), nn.Conv2d(2 * inplanes, dim, 1)
        self.fc3, self.fc4 = nn.Conv2d(4 * inplanes, dim, 1), nn.Conv2d(4 * inplanes, dim, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) -> four (B, dim, H/s, W/s) maps, s = 4, 8, 16, 32."""
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)]


class CrossAttention(AttentionCore):
    """Multi-head attention of (B, N, D) queries over (B, M, D) keys/values (stands in for the
    reference's deformable attention)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"vit_adapter: width {dim} is not divisible by num_heads {num_heads}; "
                              "pass head_args num_heads=<a divisor>")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        B, N, D = query.shape
        h = self.num_heads
        q = self.q(query).reshape(B, N, h, D // h).transpose(1, 2)
        k, v = self.kv(feat).reshape(B, feat.shape[1], 2, h, D // h).permute(2, 0, 3, 1, 4)
        return self.proj(self.attend(q, k, v).transpose(1, 2).reshape(B, N, D))


class ConvFFN(nn.Module):
    """Linear -> 3x3 depthwise conv on each level's map -> GELU -> Linear, over multi-level tokens."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        x = self.fc1(x)
        parts = torch.split(x, [h * w for h, w in shapes], dim=1)
        x = torch.cat([_to_tokens(self.dwconv(_to_map(p, s))) for p, s in zip(parts, shapes)], dim=1)
        return self.drop(self.fc2(self.drop(self.act(x))))


def _to_map(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *shape)


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


class Injector(nn.Module):
    """ViT tokens += gamma * attention(norm(tokens) -> norm(spatial tokens)); gamma starts at ``init_values``."""

    def __init__(self, dim: int, num_heads: int, init_values: float = 0.0):
        super().__init__()
        self.query_norm, self.feat_norm = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = CrossAttention(dim, num_heads)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, query: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        return query + self.gamma * self.attn(self.query_norm(query), self.feat_norm(feat))


class Extractor(nn.Module):
    """Spatial tokens += attention(norm(c) -> norm(ViT tokens)), then += ConvFFN(norm(c))."""

    def __init__(self, dim: int, num_heads: int, with_cffn: bool = True, cffn_ratio: float = 0.25,
                 drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.query_norm, self.feat_norm = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = CrossAttention(dim, num_heads)
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio), drop)
            self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
            self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, query: torch.Tensor, feat: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        query = query + self.attn(self.query_norm(query), self.feat_norm(feat))
        if self.with_cffn:
            query = query + self.drop_path(self.ffn(self.ffn_norm(query), shapes))
        return query


class InteractionBlock(nn.Module):
    """Injector before a group of ViT blocks, extractor(s) after it."""

    def __init__(self, dim: int, num_heads: int, init_values: float, extra_extractor: bool, **extractor):
        super().__init__()
        self.injector = Injector(dim, num_heads, init_values)
        self.extractor = Extractor(dim, num_heads, **extractor)
        self.extra_extractors = (
            nn.Sequential(*[Extractor(dim, num_heads, **extractor) for _ in range(2)]) if extra_extractor else None
        )

    def extract(self, c: torch.Tensor, tokens: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        c = self.extractor(c, tokens, shapes)
        for ex in self.extra_extractors or ():
            c = ex(c, tokens, shapes)
        return c


def quarter_groups(depth: int, n: int = 4) -> list[tuple[int, int]]:
    """Blocks split into ``n`` consecutive groups, as (first, last) (ViT-S: (0, 2), (3, 5), (6, 8), (9, 11))."""
    if depth < n:
        raise ConfigError(f"vit_adapter needs at least {n} ViT blocks for its {n} interactions, the backbone has {depth}")
    bounds = [round(i * depth / n) for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(n)]


@register_head("vit_adapter", tasks=("segment", "depth"))
class ViTAdapterHead(nn.Module):
    """ViT-Adapter on a plain ViT (``vit_*``, ``deit_*``, ``vitdet_*``), decoded by UperNet.

    ``forward(backbone, x)`` runs the backbone's blocks itself, group by group through its token
    path (``embed``, then ``run_blocks``), so the backbone must be an isotropic ViT. Input sides
    must be multiples of ``input_multiple`` (32, or a multiple of the patch; ``DenseModel`` pads
    to it); the output is at stride 4. ``features(backbone, x)`` returns the adapter's four maps
    (strides 4, 8, 16, 32; ``pyramid_info()`` describes them). ``decoder="upernet"`` (the
    paper's) decodes them with :class:`~vitkit.dense.heads.upernet.UperNetHead` at its defaults
    (``decoder_channels`` 512, ``decoder_norm`` "bn", ``decoder_dropout`` 0.1); ``"minimal"``
    fuses them at stride 4 (concatenation, 1x1 conv, BN, ReLU, dropout, 1x1 classifier) with
    ``decoder_channels`` (default: the ViT's width). ``prefix_tokens``: "drop" (the reference's
    ViT has no class token) or "keep" (they run through the blocks; injection and extraction use
    the patch tokens only).
    """

    def __init__(self, backbone: nn.Module, out_chans: int, attn: str = "cross", num_heads: int | None = None,
                 conv_inplane: int = 64, init_values: float = 0.0, interaction_indexes: list | None = None,
                 with_cffn: bool = True, cffn_ratio: float = 0.25, drop_path: float | None = None,
                 add_vit_feature: bool = True, use_extra_extractor: bool = True, prefix_tokens: str = "drop",
                 decoder: str = "upernet", decoder_channels: int | None = None, decoder_norm: str = "bn",
                 decoder_dropout: float = 0.1):
        super().__init__()
        if decoder not in DECODERS:
            raise ConfigError(f"vit_adapter: decoder={decoder!r}; available: 'upernet' (the paper's) or 'minimal' "
                              "(the four maps fused at stride 4)")
        if decoder_channels is not None and decoder_channels < 1:
            raise ConfigError(f"vit_adapter: decoder_channels must be >= 1, got {decoder_channels}")
        if attn != "cross":
            raise ConfigError(f"vit_adapter: attn={attn!r}; only 'cross' (multi-head cross-attention in place of "
                              "the reference's deformable attention) is available")
        if prefix_tokens not in ("drop", "keep"):
            raise ConfigError(f"vit_adapter: prefix_tokens must be 'drop' or 'keep', got {prefix_tokens!r}")
        blocks = getattr(backbone, "blocks", None)
        token_path = hasattr(backbone, "embed") and hasattr(backbone, "run_blocks")
        if not token_path or blocks is None or len({f["reduction"] for f in backbone.feature_info}) != 1:
            raise ConfigError(f"vit_adapter needs a plain ViT backbone (vit_*, deit_*, vitdet_*) with a token path and "
                              f"one stride; {type(backbone).__name__} is not one. Use model.head=upernet for pyramids")
        dim, depth = backbone.embed_dim, len(blocks)
        if num_heads is None:
            num_heads = 6 if dim % 6 == 0 else blocks[0].attn.num_heads
        groups = quarter_groups(depth) if interaction_indexes is None else [tuple(g) for g in interaction_indexes]
        if any(len(g) != 2 or not 0 <= g[0] <= g[1] < depth for g in groups):
            raise ConfigError(f"vit_adapter: interaction_indexes {interaction_indexes} must be [first, last] block "
                              f"pairs within 0..{depth - 1}")
        if drop_path is None:  # the reference uses the ViT's stochastic depth rate
            drop_path = getattr(getattr(blocks[-1], "drop_path1", None), "drop_prob", 0.0)
        patch = backbone.patch_size[0] if isinstance(backbone.patch_size, tuple) else backbone.patch_size
        self.input_multiple = 32 * patch // math.gcd(32, patch)
        self.interaction_indexes = groups
        self.add_vit_feature = add_vit_feature
        self.prefix_tokens = prefix_tokens
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.spm = SpatialPriorModule(backbone.in_chans, conv_inplane, dim)
        self.interactions = nn.ModuleList([
            InteractionBlock(dim, num_heads, init_values, extra_extractor=use_extra_extractor and i == len(groups) - 1,
                             with_cffn=with_cffn, cffn_ratio=cffn_ratio, drop_path=drop_path)
            for i in range(len(groups))
        ])
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.BatchNorm2d(dim) for _ in range(4))
        self.apply(self._init_weights)
        nn.init.normal_(self.level_embed)
        # The decoder keeps its own initialisation (mmseg's decode heads'), as in the reference.
        self.dim, self.decoder_type = dim, decoder
        if decoder == "upernet":
            up_args = dict(norm=decoder_norm, dropout=decoder_dropout)
            if decoder_channels is not None:
                up_args["channels"] = decoder_channels
            self.decoder = UperNetHead(self, out_chans, **up_args)
        else:
            width = decoder_channels or dim
            self.decoder = nn.Sequential(ConvBNReLU(4 * dim, width, 1, decoder_norm), nn.Dropout2d(decoder_dropout),
                                         seg_classifier(width, out_chans))

    def pyramid_info(self) -> list[dict]:
        """The four maps of :meth:`features`: channels and stride (what UperNet reads to build itself)."""
        return [dict(num_chs=self.dim, reduction=s) for s in (4, 8, 16, 32)]

    def no_weight_decay(self) -> set[str]:
        """The level embedding is a position-like table: no weight decay, as for a ViT's ``pos_embed``."""
        return {"level_embed"}

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def features(self, backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W), sides multiples of ``input_multiple`` -> four (B, D, H/s, W/s) maps, s = 4, 8, 16, 32."""
        c1, *levels = self.spm(x)
        shapes = [tuple(c.shape[2:]) for c in levels]
        c = torch.cat([_to_tokens(lv) + self.level_embed[i] for i, lv in enumerate(levels)], dim=1)
        tokens, ctx = backbone.embed(x)
        npt = ctx.num_prefix_tokens
        if npt and self.prefix_tokens == "drop":
            tokens, ctx, npt = tokens[:, npt:], replace(ctx, num_prefix_tokens=0), 0
        for layer, (first, last) in zip(self.interactions, self.interaction_indexes):
            patches = layer.injector(tokens[:, npt:], c)
            tokens = torch.cat([tokens[:, :npt], patches], dim=1) if npt else patches
            tokens = backbone.run_blocks(tokens, ctx, first, last + 1)
            c = layer.extract(c, tokens[:, npt:], shapes)
        c2, c3, c4 = (_to_map(p, s) for p, s in zip(torch.split(c, [h * w for h, w in shapes], dim=1), shapes))
        c1 = self.up(c2) + c1
        maps = [c1, c2, c3, c4]
        if self.add_vit_feature:
            vit = _to_map(tokens[:, npt:], ctx.grid)
            maps = [m + resize(vit, m.shape[2:]) for m in maps]
        return [norm(m) for norm, m in zip((self.norm1, self.norm2, self.norm3, self.norm4), maps)]

    def forward(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[2:]
        if H % self.input_multiple or W % self.input_multiple:
            raise ValueError(f"vit_adapter takes image sides that are multiples of {self.input_multiple} px, got "
                             f"{H}x{W}: pad the batch (DenseModel pads to its stride)")
        feats = self.features(backbone, x)
        if self.decoder_type == "upernet":
            return self.decoder.decode(feats)
        size = feats[0].shape[2:]
        return self.decoder(torch.cat([resize(f, size) for f in feats], dim=1))


__all__ = ["DECODERS", "ViTAdapterHead", "quarter_groups"]
