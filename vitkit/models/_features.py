"""Shared pieces of the backbone API for the non-ViT families: input checks and intermediates.

Convolutional families (ResNet, ConvNeXt) produce (B, C, H, W) maps per stage; token families
(CaiT, ConViT, Mixer) produce (B, L, D) tokens on a grid. Both answer ``forward_intermediates``
through the helpers here, so index handling and output layouts agree across families.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from ..layers import resample_abs_pos_embed
from ._common import PyramidMixin, check_image, check_output_fmt, take_indices


def map_to_format(x: torch.Tensor, output_fmt: str) -> torch.Tensor:
    """A (B, C, H, W) map in the asked layout: as is, or (B, H*W, C)."""
    return x if output_fmt == "NCHW" else x.flatten(2).transpose(1, 2)


def tokens_to_format(x: torch.Tensor, grid: tuple[int, int], output_fmt: str) -> torch.Tensor:
    """(B, H*W, D) patch tokens in the asked layout: as is, or a (B, D, H, W) map."""
    if output_fmt == "NLC":
        return x
    B, _, D = x.shape
    return x.reshape(B, grid[0], grid[1], D).permute(0, 3, 1, 2).contiguous()


def run_maybe_checkpointed(fn: Callable, x: torch.Tensor, enabled: bool, *args) -> torch.Tensor:
    """``fn(x, *args)``, recomputed in backward instead of stored when ``enabled`` and grads are on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, x, *args, use_reentrant=False)
    return fn(x, *args)


class Backbone(PyramidMixin):
    """The forward half of the backbone API, shared by the non-ViT families.

    A subclass defines ``_forward_all(x, take, norm, output_fmt) -> (features, intermediates)``
    (intermediates at the ``feature_info`` indices in ``take``), ``forward_head`` and
    ``grad_checkpointing``.
    """

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_all(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        pyramid: bool = False,
    ):
        """Features at the ``feature_info`` points (an int n: the last n; a list: those; None: all).

        Each is (B, C, H, W) for "NCHW" or (B, H*W, C) for "NLC"; token models drop their prefix
        tokens and, with ``norm``, pass them through the final norm (stage maps have none).
        Returns ``(forward_features(x), intermediates)``, or only the list when ``intermediates_only``.
        ``pyramid=True`` instead returns the four maps :meth:`pyramid_info` lists (strides 4/8/16/32).
        """
        if pyramid:
            return self._pyramid_intermediates(x, norm, output_fmt, intermediates_only)
        check_output_fmt(output_fmt)
        take = take_indices(len(self.feature_info), indices, "feature points")
        final, feats = self._forward_all(x, take, norm, output_fmt)
        return feats if intermediates_only else (final, feats)


class StagedFeatures(Backbone):
    """Models that are a sequence of stages producing (B, C, H, W) maps (ResNet, ConvNeXt).

    A subclass defines ``_steps()``, one callable per ``feature_info`` entry (the stem counts
    when it is a feature point), and ``in_chans``; the features are the last step's map.
    """

    def _steps(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        raise NotImplementedError

    def _forward_all(self, x: torch.Tensor, take: Sequence[int] = (), norm: bool = False, output_fmt: str = "NCHW"):
        check_image(x, self.in_chans)
        feats = []
        for i, step in enumerate(self._steps()):
            x = run_maybe_checkpointed(step, x, self.grad_checkpointing)
            if i in take:
                feats.append(map_to_format(x, output_fmt))
        return x, feats


class TokenBackbone(Backbone):
    """Token models (CaiT, ConViT, Mixer): final norm, a linear head on pooled tokens, one
    ``feature_info`` entry per block.

    Attributes a subclass sets: ``pools``, ``global_pool``, ``num_prefix_tokens``, ``embed_dim``,
    ``in_chans``; ``patch_embed``, ``pos_embed`` (patch rows only) and ``pos_drop`` where it has them.
    """

    pools: tuple[str, ...] = ("token", "avg", "")

    def _check_pool(self, global_pool: str) -> str:
        if global_pool not in self.pools:
            raise ValueError(f"global_pool {global_pool!r} must be one of {self.pools}")
        return global_pool

    def _init_head(self, num_classes: int, drop_rate: float, depth: int, reduction: int) -> None:
        self.norm = torch.nn.LayerNorm(self.embed_dim, eps=1e-6)
        self.head_drop = torch.nn.Dropout(drop_rate)
        self.head = torch.nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else torch.nn.Identity()
        self.feature_info = [
            dict(num_chs=self.embed_dim, reduction=reduction, module=f"blocks.{i}") for i in range(depth)
        ]

    def _init_vit_weights(self) -> None:
        """Truncated-normal tokens, position embedding and linears (std 0.02), zero biases."""
        for name in ("pos_embed", "cls_token"):
            torch.nn.init.trunc_normal_(getattr(self, name), std=0.02)
        for m in self.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {n for n in ("pos_embed", "cls_token") if getattr(self, n, None) is not None}

    def _embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> (B, H'*W', D) patch tokens plus a patch-only ``pos_embed`` resampled to the grid."""
        check_image(x, self.in_chans)
        grid = self.patch_embed.dynamic_grid(x.shape[2], x.shape[3])
        pos = resample_abs_pos_embed(self.pos_embed, grid, self.patch_embed.grid_size, num_prefix_tokens=0)
        return self.pos_drop(self.patch_embed(x) + pos), grid

    def _run_blocks(
        self, blocks, x: torch.Tensor, grid: tuple[int, int], take: Sequence[int], norm: bool, output_fmt: str
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run ``blocks`` on (B, N, D) patch tokens, collecting those after the blocks in ``take``."""
        feats = []
        for i, blk in enumerate(blocks):
            x = run_maybe_checkpointed(blk, x, self.grad_checkpointing)
            if i in take:
                feats.append(tokens_to_format(self.norm(x) if norm else x, grid, output_fmt))
        return x, feats

    def get_classifier(self) -> torch.nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh linear head for ``num_classes`` (0: the pooled features), optionally another pooling."""
        if global_pool is not None:
            self.global_pool = self._check_pool(global_pool)
        self.num_classes = num_classes
        device = self.norm.weight.device
        self.head = torch.nn.Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 else torch.nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)
