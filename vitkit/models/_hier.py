"""The backbone API shared by hierarchical models (Swin, PVT): stage maps at strides 4/8/16/32.

A subclass builds ``patch_embed``, ``head`` and ``feature_info`` and implements ``embed``,
``_stages`` (yield each stage's (B, H, W, C) map), ``_final_norm``, ``block_modules`` and
``group_matcher``; everything a trainer, an objective or a dense head calls lives here.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import TokenContext
from ._common import check_image, check_output_fmt, take_indices

_POOLS = ("avg", "")


def init_linear(m: nn.Module) -> None:
    """Truncated-normal (std 0.02) weights and zero biases for a Linear; other modules untouched."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class HierarchicalBackbone(nn.Module):
    """Classification head, pooling, token path and multi-scale outputs over ``_stages``."""

    num_prefix_tokens = 0
    stage_attr = "stages"  # the nn.ModuleList / Sequential of stages, each with .downsample and .blocks

    def _init_head_state(self, num_classes: int, global_pool: str, in_chans: int, num_features: int,
                         drop_rate: float) -> None:
        if global_pool not in _POOLS:
            raise ValueError(f"global_pool {global_pool!r} must be one of {_POOLS}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = self.embed_dim = num_features
        self.grad_checkpointing = False
        self.head_drop = nn.Dropout(drop_rate)

    # ------------------------------------------------------------------ backbone API
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` (0: features)."""
        if global_pool is not None:
            if global_pool not in _POOLS:
                raise ValueError(f"global_pool {global_pool!r} must be one of {_POOLS}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        if num_classes <= 0:
            self.head = nn.Identity()
            return
        device = self.patch_embed.proj.weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def aux_loss(self) -> torch.Tensor:
        """No auxiliary loss (the API objectives call on every backbone)."""
        return torch.zeros((), device=self.patch_embed.proj.weight.device)

    def group_matcher(self, coarse: bool = False) -> dict:
        s = self.stage_attr
        return {
            "stem": r"^patch_embed",
            "blocks": [
                (rf"^{s}\.(\d+)\.downsample", (0,)),
                (rf"^{s}\.(\d+)\.blocks\.(\d+)", None),
                (rf"^{s}\.(\d+)\.norm", (99999,)),
                (r"^norm", (99999,)),
            ],
        }

    def block_modules(self) -> list[nn.Module]:
        """The repeated blocks of every stage (FSDP shards each one)."""
        return [blk for stage in getattr(self, self.stage_attr) for blk in stage.blocks]

    def pyramid_info(self) -> list[dict]:
        """The four maps a dense head gets: here the stages themselves."""
        return list(self.feature_info)

    def _check_input(self, x: torch.Tensor) -> None:
        check_image(x, self.in_chans)

    # ------------------------------------------------------------------ forward
    def forward_tokens(
        self,
        tokens: torch.Tensor,
        ctx: TokenContext,
        keep: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the stages on tokens from ``embed``; returns the normalised last-stage tokens.

        token_mask: (B, L) bool, True replaces that patch token by ``mask_token`` (1, 1, C)
        (masked image modelling in the SimMIM style). ``keep`` is not supported: windows and
        convolutions need every position of the grid.
        """
        if keep is not None:
            raise ValueError(
                f"{type(self).__name__} runs on the whole token grid; keep= (dropping tokens) needs an isotropic "
                "ViT. Use token_mask= with a mask_token instead"
            )
        if token_mask is not None:
            if mask_token is None:
                raise ValueError("token_mask needs mask_token=(1, 1, C) for this model")
            tokens = torch.where(token_mask[..., None], mask_token.to(tokens.dtype), tokens)
        *_, last = self._stages(tokens, ctx)
        return self._final_norm(last).flatten(1, 2)  # (B, H * W, C)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/32 * W/32, C) normalised last-stage tokens."""
        return self.forward_tokens(*self.embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
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
        pyramid: bool = True,
    ):
        """Stage maps for dense heads, at the strides and widths ``feature_info`` lists.

        indices: an int n takes the last n stages, a list those stages, None all four.
        norm: apply the final norm to the last stage's map. Each map is (B, C, H, W) for
        ``output_fmt="NCHW"`` or (B, H*W, C) for "NLC". Returns ``(final_features,
        intermediates)`` where ``final_features`` equals ``forward_features(x)``, or only the
        list when ``intermediates_only``. ``pyramid`` is accepted for one call across
        backbones: the stages already are the pyramid.
        """
        check_output_fmt(output_fmt)
        n = len(self.feature_info)
        take = take_indices(n, indices, "stages")
        feats = []
        for i, stage_map in enumerate(self._stages(*self.embed(x))):
            if i in take:
                feats.append(self._final_norm(stage_map) if norm and i == n - 1 else stage_map)
        final = self._final_norm(stage_map).flatten(1, 2)
        if output_fmt == "NCHW":
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        else:
            feats = [f.flatten(1, 2) for f in feats]
        return feats if intermediates_only else (final, feats)

