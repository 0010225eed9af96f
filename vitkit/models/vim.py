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

from ..layers import DropPath, PatchEmbed, RMSNorm, resample_abs_pos_embed
from ..layers.mamba import BiMamba
from ._base import Backbone, Point, check_image
from ._registry import register_family


class MambaBlock(nn.Module):
    """Pre-norm residual block: x + drop_path(mixer(norm(x)))."""

    def __init__(self, dim: int, drop_path: float = 0.0, norm_eps: float = 1e-5, **mixer_kwargs):
        super().__init__()
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.mixer = BiMamba(dim, **mixer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mixer(self.norm(x)))


class VisionMamba(Backbone):
    """Vim backbone with a classification head.

    d_state / expand / d_conv: the mixer's state size, inner width ratio and conv width.
    chunk_size: positions per chunk of the parallel scan (see :func:`vitkit.layers.ssm.selective_scan`).
    global_pool: "token" (the middle class token, as trained), "avg" (mean of the patch tokens) or "".
    """

    num_prefix_tokens = 1
    no_embed_class = True  # pos_embed covers the patches; the class token carries its own
    no_weight_decay_keys = ("cls_token", "pos_embed", "A_log", "A_b_log", "D", "D_b")

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
        if embed_dim < 1 or depth < 1:
            raise ValueError(f"embed_dim {embed_dim} and depth {depth} must be >= 1")
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.in_chans = in_chans

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
        self.init_classifier(num_classes, drop_rate)
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
    def group_matcher(self, coarse: bool = False) -> dict:
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed",
            "blocks": [(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))],
        }

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

    @staticmethod
    def _class_first(x: torch.Tensor) -> torch.Tensor:
        """Scan order (class token at N // 2) -> (B, 1 + N, D) with the class token first."""
        mid = (x.shape[1] - 1) // 2
        return torch.cat([x[:, mid:mid + 1], x[:, :mid], x[:, mid + 1:]], dim=1)

    def _intermediates(self, x: torch.Tensor, take, norm: bool) -> tuple[torch.Tensor, list[Point]]:
        """(B, 1 + N, D) normalised tokens, class token first, and the tokens after the layers in ``take``."""
        x, grid = self._embed(x)
        feats = []
        for i, layer in enumerate(self.layers):
            x = self.checkpointed(layer, x)
            if i in take:
                feats.append(Point(self._class_first(self.norm_f(x) if norm else x), grid, 1))
        return self._class_first(self.norm_f(x)), feats


# ---------------------------------------------------------------------- variants
VIM_PAPER = "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model (Zhu et al., 2024)"
_NOTES = "the original hustvl/Vim checkpoints load with vitkit.load_weights (middle class-token position row folded)"
_register = register_family("vim", VisionMamba)
for _name, _dim in (("vim_tiny", 192), ("vim_small", 384)):
    _register(_name, dict(patch_size=16, embed_dim=_dim, depth=24), crop_pct=0.875, paper=VIM_PAPER, notes=_NOTES)
_register(
    "test_vim", dict(patch_size=8, embed_dim=32, depth=2, d_state=4, chunk_size=8), img=32,
    crop_pct=1.0, paper="tiny test variant", notes="for tests; not a real model",
)

__all__ = ["MambaBlock", "VisionMamba"]
