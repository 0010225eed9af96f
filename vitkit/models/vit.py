"""Vision Transformer (ViT), DeiT and the 2023+ block options, in one class.

Covers: class-token / average / attention (MAP, SigLIP's) / no pooling, register tokens,
no-embed-class (DeiT III), pre-norm before the blocks (CLIP), the MLP activation by name
(quick GELU for OpenAI CLIP), final norm or fc-norm, DeiT's distillation token,
and the modern options (RMSNorm, SwiGLU, MoE MLP, QK-norm, 2D RoPE, LayerScale).
Parameter names follow the common ViT checkpoint layout (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv``, ``head``) so converting weights is
nearly identity.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..layers import (
    Attention,
    Block,
    LinearAttention,
    Mlp,
    MoEMlp,
    PatchEmbed,
    PerformerAttention,
    RMSNorm,
    RotaryEmbedding2D,
    SwiGLU,
    TokenContext,
    get_act_layer,
    get_norm_layer,
    resample_abs_pos_embed,
    sincos_2d_pos_embed,
)
from ..layers.attn_pool import AttentionPoolLatent
from ._base import Backbone, Point, check_image, checkpoint_if
from ._registry import INCEPTION_MEAN, INCEPTION_STD, register_family

_POS_EMBEDS = ("learn", "sincos", "rope", "none")
_POS_INTERPS = ("bicubic", "bilinear")


def _swiglu(dim: int, hidden: int, **kwargs) -> SwiGLU:
    # Gated MLPs use 2/3 of the hidden width so parameters match a plain MLP of the same ratio.
    return SwiGLU(dim, int(hidden * 2 / 3), **kwargs)


def _mlp_layer(name: str, num_experts: int, top_k: int) -> type[nn.Module]:
    if name == "mlp":
        return Mlp
    if name == "swiglu":
        return _swiglu
    if name == "moe":
        return partial(MoEMlp, num_experts=num_experts, top_k=top_k)
    raise ValueError(f"unknown mlp_layer {name!r}; choose 'mlp', 'swiglu' or 'moe'")


def _norm_layer(name: str, eps: float | None):
    """The norm constructor ``norm_layer`` names, with ``eps`` when given (None: the layer's default, 1e-6)."""
    if eps is None:
        return get_norm_layer(name)
    table = {"layernorm": nn.LayerNorm, "rmsnorm": RMSNorm}
    if name.lower() not in table:
        raise ValueError(f"unknown norm_layer {name!r}; choose one of {sorted(table)}")
    return partial(table[name.lower()], eps=eps)


_ATTN_TYPES = {"softmax": Attention, "linear": LinearAttention, "performer": PerformerAttention}


def _attn_layer(name: str) -> type[nn.Module]:
    if name not in _ATTN_TYPES:
        raise ValueError(f"unknown attn_type {name!r}; choose one of {sorted(_ATTN_TYPES)}")
    return _ATTN_TYPES[name]


class VisionTransformer(Backbone):
    """ViT / DeiT backbone with a classification head.

    Token layout: ``[cls][dist][reg * R][patches]``; ``num_prefix_tokens`` counts the
    tokens before the patches.

    The token path is public: ``embed(x) -> (tokens, ctx)`` then ``forward_tokens(tokens, ctx)``
    equals ``forward_features(x)``; ``forward_tokens`` also runs on kept patch tokens only
    (``keep``, MAE) or with masked tokens replaced by a mask token (``token_mask``, iBOT; build
    with ``mask_token=True``). ``feature_info`` lists each block's channels and stride.
    ``run_blocks(tokens, ctx, start, end)`` runs a range of the blocks on that path.

    At an input size other than the build size a learned position embedding is resampled to
    the new grid: ``pos_embed_interp="bicubic"`` (antialiased, as timm) or ``"bilinear"`` (as
    DPT's reference and transformers' DPT, which makes converted DPT models match at any size).

    ``global_pool="map"`` pools with learned-query attention over the patch tokens (SigLIP's
    MAP head, timm's ``attn_pool`` keys); ``act_layer`` names the MLP activation (``"gelu"``,
    ``"quick_gelu"`` for OpenAI CLIP, ``"gelu_tanh"`` for SigLIP); ``norm_eps`` sets the norms'
    epsilon (None: 1e-6; CLIP's towers use 1e-5).
    """

    pools = ("token", "avg", "map", "")

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
        qk_norm: bool = False,
        init_values: float | None = None,
        class_token: bool = True,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        pos_embed: str = "learn",
        rope_theta: float = 100.0,
        pos_embed_interp: str = "bicubic",
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: bool | None = None,
        post_norm: bool = False,
        distilled: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: str = "layernorm",
        mlp_layer: str = "mlp",
        num_experts: int = 4,
        moe_top_k: int = 2,
        dynamic_img_pad: bool = False,
        conv_stem: bool = False,
        stem_width: int | None = None,
        mask_token: bool = False,
        attn_type: str = "softmax",
        act_layer: str = "gelu",
        norm_eps: float | None = None,
    ):
        super().__init__()
        if global_pool not in self.pools:
            raise ValueError(f"global_pool {global_pool!r} must be one of {self.pools}")
        if pos_embed not in _POS_EMBEDS:
            raise ValueError(f"pos_embed {pos_embed!r} must be one of {_POS_EMBEDS}")
        if pos_embed_interp not in _POS_INTERPS:
            raise ValueError(f"pos_embed_interp {pos_embed_interp!r} must be one of {_POS_INTERPS}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' without a class token")
        if distilled and not class_token:
            raise ValueError("a distilled model needs class_token=True")
        if embed_dim < 1 or depth < 1 or num_heads < 1:
            raise ValueError(f"embed_dim {embed_dim}, depth {depth} and num_heads {num_heads} must all be >= 1")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if reg_tokens < 0:
            raise ValueError(f"reg_tokens must be >= 0, got {reg_tokens}")
        if pos_embed == "rope" and (embed_dim // num_heads) % 4:
            raise ValueError(
                f"RoPE needs head_dim divisible by 4, but embed_dim {embed_dim} / num_heads {num_heads} "
                f"= {embed_dim // num_heads}"
            )
        norm = _norm_layer(norm_layer, norm_eps)
        act = get_act_layer(act_layer)
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm

        self.num_features = self.embed_dim = embed_dim
        self.in_chans = in_chans
        self.distilled = distilled
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.num_prefix_tokens = int(class_token) + int(distilled) + reg_tokens
        self.global_pool = global_pool
        self.no_embed_class = no_embed_class
        self.pos_embed_type = pos_embed
        self.pos_embed_interp = pos_embed_interp

        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, bias=not pre_norm, dynamic_pad=dynamic_img_pad,
            conv_stem=conv_stem, stem_width=stem_width,
        )
        self.patch_size = self.patch_embed.patch_size
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        # Only masked-image objectives use it; absent otherwise so checkpoint keys stay the plain ViT's.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        embed_len = grid[0] * grid[1] + (0 if no_embed_class else self.num_prefix_tokens)
        if pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.randn(1, embed_len, embed_dim) * 0.02)
        elif pos_embed == "sincos":
            pe = torch.zeros(1, embed_len, embed_dim)
            pe[0, embed_len - grid[0] * grid[1]:] = sincos_2d_pos_embed(embed_dim, grid)
            self.pos_embed = nn.Parameter(pe, requires_grad=False)
        else:
            self.pos_embed = None
        self.rope = RotaryEmbedding2D(embed_dim // num_heads, rope_theta) if pos_embed == "rope" else None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.norm_pre = norm(embed_dim) if pre_norm else nn.Identity()

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        mlp = _mlp_layer(mlp_layer, num_experts, moe_top_k)
        attn = _attn_layer(attn_type)  # softmax (SDPA), or O(N) linear / Performer for long sequences
        self.blocks = nn.Sequential(*[
            Block(
                embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm, init_values=init_values,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm,
                mlp_layer=mlp, post_norm=post_norm, attn_layer=attn, act_layer=act,
            )
            for i in range(depth)
        ])
        self.norm = norm(embed_dim) if final_norm and not use_fc_norm else nn.Identity()
        # After the blocks and before the classifier, where timm's state dicts list it.
        self.attn_pool = (
            AttentionPoolLatent(embed_dim, num_heads, mlp_ratio, norm_layer=norm, act_layer=act)
            if global_pool == "map" else None
        )
        self.init_classifier(
            num_classes, drop_rate, distilled, fc_norm=norm(embed_dim) if final_norm and use_fc_norm else None
        )
        reduction = self.patch_size[0] if self.patch_size[0] == self.patch_size[1] else self.patch_size
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f"blocks.{i}") for i in range(depth)]
        self._init_weights()

    def _init_weights(self) -> None:
        for name in ("cls_token", "dist_token", "reg_token"):
            p = getattr(self, name)
            if p is not None:
                nn.init.normal_(p, std=1e-6 if name != "dist_token" else 0.02)
        if self.pos_embed is not None and self.pos_embed.requires_grad:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.attn_pool is not None:
            self.attn_pool.init_weights()
        if self.mask_token is not None:
            # Last, so the flag does not change how any other parameter is drawn.
            nn.init.normal_(self.mask_token, std=0.02)

    # ------------------------------------------------------------------ backbone API
    no_weight_decay_keys = ("pos_embed", "cls_token", "dist_token", "reg_token", "mask_token")
    distill_from_pooled = False  # DeiT's distillation head reads the distillation token

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor], log) -> dict[str, torch.Tensor]:
        """A ViT checkpoint -> this ViT: a final ``norm`` where this model has ``fc_norm`` (or the
        reverse) moves over, and a missing ``mask_token`` keeps the model's initialisation."""
        sd = dict(state_dict)
        target = self.state_dict()
        has = {n: any(k.startswith(n + ".") for k in sd) for n in ("norm", "fc_norm")}
        wants = {n: any(k.startswith(n + ".") for k in target) for n in ("norm", "fc_norm")}
        for src, dst in (("norm", "fc_norm"), ("fc_norm", "norm")):
            if has[src] and not has[dst] and wants[dst] and not wants[src]:
                for k in [k for k in sd if k.startswith(src + ".")]:
                    sd[dst + k[len(src):]] = sd.pop(k)
                log.notes.append(
                    f"checkpoint's final '{src}' loaded as the model's '{dst}' (the norm is applied "
                    f"{'after' if dst == 'fc_norm' else 'before'} pooling): a starting point for fine-tuning, "
                    "not the checkpoint's exact features"
                )
        if "mask_token" in target and "mask_token" not in sd:
            sd["mask_token"] = target["mask_token"]
            log.notes.append("checkpoint has no mask_token; the model's keeps its fresh initialisation and must be trained")
        return sd

    def _check_pool(self, global_pool: str) -> None:
        super()._check_pool(global_pool)
        if global_pool == "token" and not self.has_class_token:
            raise ValueError(f"global_pool {global_pool!r} is not valid for a model without a class token")
        # Before the pool is built (in __init__) there is no attribute yet; afterwards it must exist.
        if global_pool == "map" and getattr(self, "attn_pool", "building") is None:
            raise ValueError(
                "global_pool='map' needs the attention pool, which is built with the model: "
                "create the model with global_pool='map'"
            )

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "map":
            # The latent query attends over the patch tokens only, as timm (pool_include_prefix=False).
            return self.attn_pool(x[:, self.num_prefix_tokens:])
        return super().pool(x)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        if global_pool is not None and global_pool != "map" and self.attn_pool is not None:
            self.attn_pool = None  # an unused pool would leave parameters without gradients (DDP)

    def group_matcher(self, coarse: bool = False) -> dict:
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed|^reg_token|^dist_token|^mask_token|^norm_pre",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    def block_modules(self) -> list[nn.Module]:
        """The repeated blocks (FSDP shards each one)."""
        return list(self.blocks)

    def attention_stats(self, h: int, w: int) -> list[dict]:
        """What attention costs on an h x w image, per stage (one stage here): for ``vitkit info``."""
        grid = self.patch_embed.dynamic_grid(h, w)
        n = grid[0] * grid[1] + self.num_prefix_tokens
        heads = self.blocks[0].attn.num_heads
        return [dict(module="blocks", grid=list(grid), tokens=n, heads=heads, keys_per_query=n,
                     attn_elems=heads * n * n, blocks=len(self.blocks))]

    def _pyramid_plan(self) -> list[tuple[int, float]]:
        """The simple pyramid (ViTDet): the last block's map at 4x, 2x, 1x and 0.5x its resolution."""
        last = len(self.blocks) - 1
        return [(last, 4.0), (last, 2.0), (last, 1.0), (last, 0.5)]

    def pyramid_info(self) -> list[dict]:
        p = self.patch_size[0]
        return [dict(num_chs=self.embed_dim, reduction=p * s, module="blocks") for s in (0.25, 0.5, 1, 2)]

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE load-balancing losses from the last forward (0 without MoE)."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoEMlp)]
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.patch_embed.proj.weight.device)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        check_image(x, self.in_chans)

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add position embeddings and prepend prefix tokens. x: (B, H'*W', C) -> (B, N, C).

        Also returns the patch rows of the position embedding, (1, H'*W', C) or None.
        """
        B = x.shape[0]
        pos = self.pos_embed
        npt = 0 if self.no_embed_class else self.num_prefix_tokens
        if pos is not None and grid != self.patch_embed.grid_size:
            if self.pos_embed_type == "sincos":
                grid_pe = sincos_2d_pos_embed(self.embed_dim, grid).to(pos)[None]
                pos = torch.cat([pos[:, :npt], grid_pe], dim=1)
            else:
                pos = self._resample_pos_embed(pos, grid, self.patch_embed.grid_size, npt)
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            if pos is not None:
                x = x + pos
            x = torch.cat(prefix + [x], dim=1) if prefix else x
        else:
            x = torch.cat(prefix + [x], dim=1) if prefix else x
            if pos is not None:
                x = x + pos
        return self.pos_drop(x), None if pos is None else pos[:, npt:]

    # timm's rule: bicubic resampling antialiased (its kernel differs from plain bicubic even upwards).
    pos_embed_antialias = True

    def _resample_pos_embed(
        self, pos: torch.Tensor, grid: tuple[int, int], old_grid: tuple[int, int], num_prefix_tokens: int
    ) -> torch.Tensor:
        """A learned position embedding on ``old_grid`` -> ``grid``, by ``pos_embed_interp``.

        Bilinear is never antialiased: that is how DPT's reference and transformers resample.
        """
        antialias = self.pos_embed_antialias and self.pos_embed_interp == "bicubic"
        return resample_abs_pos_embed(pos, grid, old_grid, num_prefix_tokens=num_prefix_tokens,
                                      interpolation=self.pos_embed_interp, antialias=antialias)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, TokenContext]:
        """(B, C, H, W) -> (B, prefix + H'*W', D) tokens ready for the blocks, and their context.

        Patchify, position embedding (resampled to the input's grid), prefix tokens, pre-norm.
        RoPE is not applied here: the blocks rotate q and k from ``ctx.positions``.
        """
        self._check_input(x)
        grid = self.patch_embed.dynamic_grid(x.shape[2], x.shape[3])
        x = self.patch_embed(x)  # (B, H'*W', C)
        positions = torch.arange(x.shape[1], device=x.device)[None]  # (1, H'*W') row-major grid order
        x, patch_pos = self._pos_embed(x, grid)
        x = self.norm_pre(x)
        return x, TokenContext(grid, self.num_prefix_tokens, positions, pos_embed=patch_pos)

    def _apply_mask_token(
        self, x: torch.Tensor, ctx: TokenContext, token_mask: torch.Tensor, mask_token: torch.Tensor | None
    ) -> torch.Tensor:
        """Replace the patch tokens where ``token_mask`` (B, L) is True by the mask token at their position."""
        mask_token = self.mask_token if mask_token is None else mask_token
        if mask_token is None:
            raise ValueError(
                "token_mask needs a mask token: build the model with mask_token=True "
                "(model.args: {mask_token: true}) or pass mask_token=(1, 1, D) to forward_tokens"
            )
        B, N, D = x.shape
        L = N - ctx.num_prefix_tokens
        if token_mask.shape != (B, L) or token_mask.dtype != torch.bool:
            raise ValueError(
                f"token_mask must be a (B={B}, L={L}) bool tensor over the patch tokens, "
                f"got {token_mask.dtype} {tuple(token_mask.shape)}"
            )
        # The mask token goes through what a patch token went through in embed: + position, pre-norm.
        fill = mask_token.reshape(1, 1, D).to(x.dtype)
        if ctx.pos_embed is not None:
            fill = fill + ctx.pos_embed
        fill = self.norm_pre(self.pos_drop(fill))  # (1 or B, L, D)
        npt = ctx.num_prefix_tokens
        patches = torch.where(token_mask[..., None], fill, x[:, npt:])
        return torch.cat([x[:, :npt], patches], dim=1)

    def _block_inputs(self, ctx: TokenContext):
        """RoPE tables for the tokens' positions and the attention bias, shared by every block."""
        rope = self.rope(ctx.grid, ctx.positions) if self.rope is not None else None
        return rope, ctx.attention_bias()

    def _run_block(self, blk: nn.Module, x: torch.Tensor, rope, attn_bias) -> torch.Tensor:
        return checkpoint_if(self.grad_checkpointing, blk, x, rope, self.num_prefix_tokens, attn_bias)

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        ctx: TokenContext,
        keep: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the blocks and the final norm on tokens from :meth:`embed`.

        keep: (B, K) indices of the patch tokens to run (prefix tokens always run); the output
            is (B, prefix + K, D), the kept tokens in ``keep`` order, and positions follow them.
        token_mask: (B, L) bool, True replaces that patch token by the mask token (plus its
            position embedding); ``mask_token`` overrides the model's own. Applied before ``keep``.
        """
        if token_mask is not None:
            tokens = self._apply_mask_token(tokens, ctx, token_mask, mask_token)
        if keep is not None:
            tokens, ctx = ctx.select(tokens, keep)
        return self.norm(self.run_blocks(tokens, ctx))

    def run_blocks(self, tokens: torch.Tensor, ctx: TokenContext, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run blocks ``start .. end - 1`` on tokens from :meth:`embed` (no final norm).

        Each block gets what :meth:`forward_tokens` gives it (RoPE at ``ctx.positions``, the
        attention bias of ``ctx``, gradient checkpointing when enabled), so running the blocks
        in consecutive ranges equals running them all at once. For heads that interleave their
        own layers with the backbone's blocks (ViT-Adapter).
        """
        rope, bias = self._block_inputs(ctx)
        for blk in self.blocks[start:end]:
            tokens = self._run_block(blk, tokens, rope, bias)
        return tokens

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) normalised tokens, prefix tokens first."""
        return self.forward_tokens(*self.embed(x))

    def _intermediates(self, x: torch.Tensor, take, norm: bool) -> tuple[torch.Tensor, list[Point]]:
        """The token path of :meth:`forward_features`, keeping the tokens after the blocks in ``take``."""
        x, ctx = self.embed(x)
        rope, bias = self._block_inputs(ctx)
        feats = []
        for i, blk in enumerate(self.blocks):
            x = self._run_block(blk, x, rope, bias)
            if i in take:
                feats.append(Point(self.norm(x) if norm else x, ctx.grid, self.num_prefix_tokens))
        return self.norm(x), feats


# ---------------------------------------------------------------------- variants
_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}

VIT_PAPER = "An Image is Worth 16x16 Words (Dosovitskiy et al., 2021)"
DEIT_PAPER = "Training data-efficient image transformers & distillation through attention (Touvron et al., 2021)"
REG_PAPER = "Vision Transformers Need Registers (Darcet et al., 2024)"
DINOV2_PAPER = "DINOv2: Learning Robust Visual Features without Supervision (Oquab et al., 2024)"
MAE_PAPER = "Masked Autoencoders Are Scalable Vision Learners (He et al., 2022)"


_register = register_family("vit", VisionTransformer)


# ViT paper sizes; the hub ids name checkpoints in the common single-file safetensors layout.
_VIT_HUB = {
    ("tiny", 16, 224): "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    ("tiny", 16, 384): "timm/vit_tiny_patch16_384.augreg_in21k_ft_in1k",
    ("small", 16, 224): "timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
    ("small", 32, 224): "timm/vit_small_patch32_224.augreg_in21k_ft_in1k",
    ("small", 16, 384): "timm/vit_small_patch16_384.augreg_in21k_ft_in1k",
    ("small", 8, 224): "timm/vit_small_patch8_224.dino",
    ("base", 16, 224): "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
    ("base", 32, 224): "timm/vit_base_patch32_224.augreg_in21k_ft_in1k",
    ("base", 8, 224): "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k",
    ("base", 16, 384): "timm/vit_base_patch16_384.augreg_in21k_ft_in1k",
    ("base", 32, 384): "timm/vit_base_patch32_384.augreg_in21k_ft_in1k",
    ("large", 16, 224): "timm/vit_large_patch16_224.augreg_in21k_ft_in1k",
    ("large", 16, 384): "timm/vit_large_patch16_384.augreg_in21k_ft_in1k",
    ("large", 32, 384): "timm/vit_large_patch32_384.orig_in21k_ft_in1k",
    ("huge", 14, 224): "timm/vit_huge_patch14_224.orig_in21k",
}
for size in _SIZES:
    for patch in (8, 14, 16, 32):
        for img in (224, 384):
            if img == 384 and patch == 14:
                continue
            _register(
                f"vit_{size}_patch{patch}_{img}",
                dict(_SIZES[size], patch_size=patch),
                img=img,
                mean=INCEPTION_MEAN,
                std=INCEPTION_STD,
                crop_pct=0.9 if img == 224 else 1.0,
                paper=VIT_PAPER,
                hub_id=_VIT_HUB.get((size, patch, img)),
            )

# Global average pooling with fc-norm and registers, the layout of register-token ViTs.
for size in ("small", "base"):
    _register(
        f"vit_{size}_patch16_reg4_gap_256",
        dict(_SIZES[size], patch_size=16, reg_tokens=4, class_token=False, global_pool="avg", no_embed_class=True),
        img=256, mean=INCEPTION_MEAN, std=INCEPTION_STD, crop_pct=0.95, paper=REG_PAPER,
        hub_id="timm/vit_base_patch16_reg4_gap_256.sbb_in1k" if size == "base" else None,
    )

# DeiT: ViT with the DeiT training recipe; distilled variants carry a distillation token.
for size in ("tiny", "small", "base"):
    _register(
        f"deit_{size}_patch16_224", dict(_SIZES[size], patch_size=16), crop_pct=0.875, paper=DEIT_PAPER,
        hub_id=f"timm/deit_{size}_patch16_224.fb_in1k",
    )
    _register(
        f"deit_{size}_distilled_patch16_224", dict(_SIZES[size], patch_size=16, distilled=True), crop_pct=0.875,
        paper=DEIT_PAPER, hub_id=f"timm/deit_{size}_distilled_patch16_224.fb_in1k",
    )

# DINOv2 backbones (LayerScale, patch 14, features only) with and without registers.
for size in ("small", "base", "large"):
    for reg in (0, 4):
        suffix = "_reg4" if reg else ""
        _register(
            f"vit_{size}_patch14{suffix}_dinov2",
            dict(_SIZES[size], patch_size=14, init_values=1e-5, reg_tokens=reg, no_embed_class=bool(reg), num_classes=0),
            img=518, num_classes=0, crop_pct=1.0, paper=DINOV2_PAPER if not reg else REG_PAPER,
            hub_id=f"timm/vit_{size}_patch14{suffix}_dinov2.lvd142m",
        )

# MAE pretrained encoders: fixed sin-cos position embeddings, features only.
for size in ("base", "large"):
    _register(
        f"vit_{size}_patch16_224_mae", dict(_SIZES[size], patch_size=16, num_classes=0),
        num_classes=0, paper=MAE_PAPER, hub_id=f"timm/vit_{size}_patch16_224.mae",
    )

# The 2023+ recipe: RMSNorm, SwiGLU, QK-norm, 2D RoPE, LayerScale and registers.
_MODERN = dict(
    norm_layer="rmsnorm", mlp_layer="swiglu", qk_norm=True, pos_embed="rope", init_values=1e-5, reg_tokens=4,
    qkv_bias=False,
)
for size in ("tiny", "small", "base"):
    _register(
        f"vit_modern_{size}_patch16_224", dict(_SIZES[size], patch_size=16, **_MODERN),
        paper="ViT with RMSNorm, SwiGLU, QK-norm, 2D RoPE, LayerScale and registers",
    )

# Small-image variants that vitkit picks for 28-64 px data (and first runs on CPU):
# a convolutional stem and few, narrow blocks train in minutes on a laptop.
_SMALL_DATA = dict(embed_dim=192, depth=6, num_heads=3, mlp_ratio=3.0, conv_stem=True, global_pool="avg")
_register(
    "vit_nano_convstem_patch4_32", dict(_SMALL_DATA, patch_size=4), img=32, crop_pct=1.0, num_classes=10,
    paper="Early Convolutions Help Transformers See Better (Xiao et al., 2021)",
    notes="for 28-40 px images (MNIST, CIFAR)",
)
_register(
    "vit_nano_convstem_patch8_64", dict(_SMALL_DATA, patch_size=8), img=64, crop_pct=1.0, num_classes=10,
    paper="Early Convolutions Help Transformers See Better (Xiao et al., 2021)",
    notes="for 48-128 px images with fine detail",
)
_register(
    "vit_nano_convstem_patch16_64", dict(_SMALL_DATA, patch_size=16, depth=4), img=64, crop_pct=1.0,
    num_classes=10, paper="Early Convolutions Help Transformers See Better (Xiao et al., 2021)",
    notes="for 48-128 px images of large objects (the built-in shapes data); 17 tokens, fast on a CPU",
)

# Tiny variants for fast tests and first runs.
_TEST = dict(embed_dim=64, depth=2, num_heads=2, patch_size=8)
_TEST_CARD = dict(img=32, crop_pct=1.0, paper="tiny test variant", notes="for tests; not a real model")
_register("test_vit", dict(_TEST), **_TEST_CARD)
_register("test_vit_gap", dict(_TEST, global_pool="avg", class_token=False), **_TEST_CARD)
_register("test_vit_reg", dict(_TEST, reg_tokens=2, no_embed_class=True), **_TEST_CARD)
_register("test_vit_prenorm", dict(_TEST, pre_norm=True, post_norm=False), **_TEST_CARD)
_register("test_vit_postnorm", dict(_TEST, post_norm=True, final_norm=False), **_TEST_CARD)
_register("test_vit_sincos", dict(_TEST, pos_embed="sincos"), **_TEST_CARD)
_register("test_vit_modern", dict(_TEST, **_MODERN), **_TEST_CARD)
_register("test_vit_convstem", dict(_TEST, conv_stem=True), **_TEST_CARD)
_register("test_vit_moe", dict(_TEST, mlp_layer="moe", num_experts=4, moe_top_k=2), **_TEST_CARD)
_register("test_deit_distilled", dict(_TEST, distilled=True), **_TEST_CARD)


__all__ = ["VisionTransformer"]
