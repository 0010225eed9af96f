"""Vision Mamba (Vim): patch tokens mixed by bidirectional selective state-space scans.

Each block is ``x + mixer(RMSNorm(x))`` with a :class:`~vitkit.layers.mamba.BiMamba` mixer,
whose cost grows linearly with the token count (attention grows quadratically). The class
token sits in the middle of the sequence, so both scan directions reach it after half the
patches; its output is the image feature.

Parameter names follow the Vision Mamba checkpoints (``patch_embed.proj``, ``layers.N.mixer``,
``layers.N.norm``, ``norm_f``, ``head``) except that ``pos_embed`` holds the patch rows only:
the class token's position row is folded into ``cls_token`` (the same sum reaches the blocks),
so position embeddings resample like a ViT's. :func:`vitkit.convert.vim.convert_vim` does
the fold for the original checkpoints.

``forward_features`` returns the tokens with the class token moved to the front, (B, 1 + N, D),
the layout every other vitkit backbone uses.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import DropPath, PatchEmbed, RMSNorm, resample_abs_pos_embed
from ..layers.mamba import BiMamba
from ._common import (
    BackboneMixin,
    check_image,
    check_output_fmt,
    register_variant,
    take_indices,
    tokens_to_map,
)

_POOLS = ("token", "avg", "")


class MambaBlock(nn.Module):
    """Pre-norm residual block: x + drop_path(mixer(norm(x)))."""

    def __init__(self, dim: int, drop_path: float = 0.0, norm_eps: float = 1e-5, **mixer_kwargs):
        super().__init__()
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.mixer = BiMamba(dim, **mixer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mixer(self.norm(x)))


class VisionMamba(BackboneMixin, nn.Module):
    """Vim backbone with a classification head.

    d_state / expand / d_conv: the mixer's state size, inner width ratio and conv width.
    chunk_size: positions per chunk of the parallel scan (see :func:`vitkit.layers.ssm.selective_scan`).
    global_pool: "token" (the middle class token, as trained), "avg" (mean of the patch tokens) or "".
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        chunk_size: int = 64,
        global_pool: str = "token",
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        dynamic_img_pad: bool = False,
    ):
        super().__init__()
        if global_pool not in _POOLS:
            raise ValueError(f"global_pool {global_pool!r} must be one of {_POOLS}")
        if embed_dim < 1 or depth < 1:
            raise ValueError(f"embed_dim {embed_dim} and depth {depth} must be >= 1")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.in_chans = in_chans
        self.num_prefix_tokens = 1
        self.no_embed_class = True  # pos_embed covers the patches; the class token carries its own
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, dynamic_pad=dynamic_img_pad)
        self.patch_size = self.patch_embed.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList([
            MambaBlock(embed_dim, dpr[i], norm_eps, d_state=d_state, expand=expand, d_conv=d_conv, chunk_size=chunk_size)
            for i in range(depth)
        ])
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        reduction = self.patch_size[0] if self.patch_size[0] == self.patch_size[1] else self.patch_size
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f"layers.{i}") for i in range(depth)]
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and m.bias is not None and not name.endswith("dt_proj") and not name.endswith("dt_proj_b"):
                nn.init.zeros_(m.bias)
        # Each block adds to the residual stream; shrinking the output projection by 1/sqrt(depth)
        # keeps the stream's variance from growing with depth (GPT-2's rule).
        for layer in self.layers:
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(depth)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)

    # ------------------------------------------------------------------ backbone API
    def no_weight_decay(self) -> set[str]:
        names = {"cls_token", "pos_embed"}
        for i in range(len(self.layers)):
            names |= {f"layers.{i}.mixer.{p}" for p in ("A_log", "A_b_log", "D", "D_b")}
        return names

    def group_matcher(self, coarse: bool = False) -> dict:
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed",
            "blocks": [(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))],
        }

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in _POOLS:
                raise ValueError(f"global_pool {global_pool!r} must be one of {_POOLS}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        if num_classes > 0:
            self.head = nn.Linear(self.embed_dim, num_classes, device=self.cls_token.device)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()

    # ------------------------------------------------------------------ forward
    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> (B, N + 1, D) tokens in scan order (class token at N // 2) and the grid."""
        check_image(x, self.in_chans)
        grid = self.patch_embed.dynamic_grid(x.shape[2], x.shape[3])
        x = self.patch_embed(x)  # (B, N, D)
        pos = self.pos_embed
        if grid != self.patch_embed.grid_size:
            pos = resample_abs_pos_embed(pos, grid, self.patch_embed.grid_size, num_prefix_tokens=0)
        x = x + pos
        mid = x.shape[1] // 2
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :mid], cls, x[:, mid:]], dim=1)  # (B, N + 1, D)
        return self.pos_drop(x), grid

    def _run_layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, x, use_reentrant=False)
        return layer(x)

    @staticmethod
    def _class_first(x: torch.Tensor) -> torch.Tensor:
        """Scan order (class token at N // 2) -> (B, 1 + N, D) with the class token first."""
        mid = (x.shape[1] - 1) // 2
        return torch.cat([x[:, mid:mid + 1], x[:, :mid], x[:, mid + 1:]], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + N, D) normalised tokens, class token first."""
        x, _ = self._embed(x)
        for layer in self.layers:
            x = self._run_layer(layer, x)
        return self._class_first(self.norm_f(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, 1:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_prefix_tokens: bool = False,
        pyramid: bool = False,
    ):
        """Per-block patch features, (B, D, H', W') for "NCHW" or (B, H'*W', D) for "NLC".

        indices: an int n takes the last n blocks, a list those blocks, None all. ``norm`` applies
        the final norm. Returns ``(forward_features(x), intermediates)`` or only the list.
        ``pyramid=True`` instead returns the four maps :meth:`pyramid_info` lists (strides
        4/8/16/32); ``indices`` is then ignored.
        """
        if pyramid:
            if return_prefix_tokens:
                raise ValueError("pyramid=True returns maps only; it cannot return prefix tokens")
            return self._pyramid_intermediates(x, norm, output_fmt, intermediates_only)
        check_output_fmt(output_fmt)
        take = take_indices(len(self.layers), indices)
        x, grid = self._embed(x)
        feats = []
        for i, layer in enumerate(self.layers):
            x = self._run_layer(layer, x)
            if i in take:
                feats.append(self._class_first(self.norm_f(x) if norm else x))
        prefixes = [f[:, :1] for f in feats]
        feats = [f[:, 1:] for f in feats]
        if output_fmt == "NCHW":
            feats = [tokens_to_map(f, grid) for f in feats]
        if return_prefix_tokens:
            feats = list(zip(feats, prefixes))
        if intermediates_only:
            return feats
        return self._class_first(self.norm_f(x)), feats


# ---------------------------------------------------------------------- variants
VIM_PAPER = "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model (Zhu et al., 2024)"
_NOTES = "the original hustvl/Vim checkpoints load with vitkit.load_weights (middle class-token position row folded)"
for _name, _dim in (("vim_tiny", 192), ("vim_small", 384)):
    register_variant(
        VisionMamba, _name, "vim", dict(patch_size=16, embed_dim=_dim, depth=24), crop_pct=0.875, paper=VIM_PAPER,
        notes=_NOTES,
    )
register_variant(
    VisionMamba, "test_vim", "vim", dict(patch_size=8, embed_dim=32, depth=2, d_state=4, chunk_size=8), img=32,
    crop_pct=1.0, paper="tiny test variant", notes="for tests; not a real model",
)

__all__ = ["MambaBlock", "VisionMamba"]
