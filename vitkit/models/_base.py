"""The one backbone base: every family declares its stem and its stages (or token blocks), this
class implements the rest of the backbone API once.

A family sets, in ``__init__``: ``in_chans``, ``num_classes``, ``num_features``, ``global_pool``
(checked against ``pools``), ``feature_info`` (one dict per feature point: ``num_chs``,
``reduction``, ``module``) and its classifier through :meth:`Backbone.init_classifier`. It
implements ``_intermediates(x, take, norm)``: run the model on an image batch and return
``(forward_features(x), [Point per index in take])``. Everything else, ``forward``,
``forward_features``, ``forward_head`` (pooling, dropout, classifier and distillation head),
``forward_intermediates`` with its pyramid, ``reset_classifier``, gradient checkpointing,
``no_weight_decay`` and ``aux_loss``, lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import resample_abs_pos_embed
from ..layers.pyramid import build_pyramid, pyramid_plan


# ---------------------------------------------------------------------- shared helpers
def check_image(x: torch.Tensor, in_chans: int) -> None:
    """Raise a clear error unless ``x`` is a floating (B, in_chans, H, W) tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor image batch, got {type(x).__name__}")
    if x.ndim != 4:
        hint = " (add a batch dim with x.unsqueeze(0))" if x.ndim == 3 else ""
        raise ValueError(f"expected a 4-D (B, C, H, W) tensor, got {x.ndim}-D shape {tuple(x.shape)}{hint}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"model expects {in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)}); "
            f"convert the images or build the model with in_chans={x.shape[1]}"
        )
    if not x.is_floating_point():
        raise TypeError(f"expected a floating point image tensor, got {x.dtype}; convert with x.float() / 255 and normalise")


def take_indices(count: int, indices: int | Sequence[int] | None, what: str = "blocks") -> list[int]:
    """``forward_intermediates`` indices -> sorted positions: an int n is the last n, None all, negatives count back."""
    if indices is None:
        return list(range(count))
    if isinstance(indices, int):
        if not 1 <= indices <= count:
            raise ValueError(f"indices={indices} asks for the last {indices} of {count} {what}")
        return list(range(count - indices, count))
    take = []
    for i in indices:
        if not -count <= i < count:
            raise ValueError(f"index {i} is out of range for a model with {count} {what}")
        take.append(i % count)
    return sorted(set(take))


def check_output_fmt(output_fmt: str) -> None:
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), row-major."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    B, _, C = x.shape
    return x.reshape(B, grid[0], grid[1], C).permute(0, 3, 1, 2).contiguous()


def checkpoint_if(enabled: bool, fn: Callable, *args):
    """``fn(*args)``, recomputed in backward instead of stored when ``enabled`` and grads are on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def trunc_normal_linear(m: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal weights and zero biases for a Linear; other modules untouched."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class Point(NamedTuple):
    """One feature point of ``_intermediates``: a (B, C, H, W) map (``grid`` None) or (B, prefix + H*W, C) tokens."""

    x: torch.Tensor
    grid: tuple[int, int] | None = None
    prefix: int = 0


class ClassifierHead(nn.Module):
    """A head nested under ``head`` (timm's ``head.norm`` / ``head.fc``): norm after pooling, dropout, linear.

    Families whose checkpoints keep the classifier flat (``head``, ``fc_norm``, ``head_drop``)
    hold the same three parts on the model instead; :meth:`Backbone.forward_head` runs either.
    """

    def __init__(self, fc: nn.Module, drop_rate: float = 0.0, norm: nn.Module | None = None):
        super().__init__()
        self.norm = norm if norm is not None else nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.fc = fc


# ---------------------------------------------------------------------- the base
class Backbone(nn.Module):
    """The backbone API over a family's ``_intermediates``; see the module docstring."""

    pools: tuple[str, ...] = ("token", "avg", "")
    num_prefix_tokens = 0
    # Where the classifier Linear lives, by timm's key ("head", "fc" for ResNet, "head.fc" nested).
    classifier_name = "head"
    # A distillation head reads the pooled features too (LeViT, EfficientFormer); DeiT's reads its own token.
    distill_from_pooled = True

    def __init__(self):
        super().__init__()
        self.grad_checkpointing = False

    # ------------------------------------------------------------------ pooling and the head
    @property
    def global_pool(self) -> str:
        return self._global_pool

    @global_pool.setter
    def global_pool(self, value: str) -> None:
        self._check_pool(value)
        self._global_pool = value

    def _check_pool(self, global_pool: str) -> None:
        if global_pool not in self.pools:
            raise ValueError(f"global_pool {global_pool!r} must be one of {self.pools} for {type(self).__name__}")

    def init_classifier(self, num_classes: int, drop_rate: float = 0.0, distilled: bool = False,
                        fc_norm: nn.Module | None = None, head_norm: nn.Module | None = None) -> None:
        """Build the classifier where ``classifier_name`` says: flat (``fc_norm``, ``head_drop`` and
        the Linear on the model) or nested (a :class:`ClassifierHead` at ``head``); ``head_dist``
        beside it when ``distilled``. Call it where the family's checkpoints list the head."""
        self.num_classes = num_classes
        if self.classifier_name == "head.fc":
            self.head = ClassifierHead(self._new_classifier(num_classes, init=False), drop_rate, head_norm)
        else:
            self.fc_norm = fc_norm if fc_norm is not None else nn.Identity()
            self.head_drop = nn.Dropout(drop_rate)
            setattr(self, self.classifier_name, self._new_classifier(num_classes, init=False))
        self.head_dist = self._new_classifier(num_classes, init=False) if distilled else None

    # std of a fresh classifier's truncated-normal weights; None keeps PyTorch's Linear init.
    classifier_init_std: float | None = 0.02

    def _new_classifier(self, num_classes: int, init: bool = True, device=None) -> nn.Module:
        """A classifier for ``num_classes`` (Identity for 0); ``init`` draws it as a fresh head is drawn."""
        if num_classes <= 0:
            return nn.Identity()
        fc = nn.Linear(self.num_features, num_classes, device=device)
        if init and self.classifier_init_std is not None:
            trunc_normal_linear(fc, self.classifier_init_std)
        return fc

    def _head_parts(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(norm after pooling, dropout, classifier), wherever the family keeps them."""
        if self.classifier_name == "head.fc":
            head = self.head
            return head.norm, head.drop, head.fc
        return self.fc_norm, self.head_drop, getattr(self, self.classifier_name)

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Fresh classifier(s) for ``num_classes`` (0: the pooled features), optionally another pooling."""
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        device = next(self.parameters()).device
        owner, _, name = self.classifier_name.rpartition(".")
        setattr(self.get_submodule(owner) if owner else self, name, self._new_classifier(num_classes, device=device))
        if self.head_dist is not None:
            self.head_dist = self._new_classifier(num_classes, device=device)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens or a (B, C, H, W) map -> (B, C) by ``global_pool`` ("" keeps ``x``)."""
        pool = self._global_pool
        if pool == "avg":
            return x.mean(dim=(2, 3)) if x.ndim == 4 else x[:, self.num_prefix_tokens:].mean(dim=1)
        if pool == "token":
            return x[:, 0]
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        norm, drop, fc = self._head_parts()
        head_dist = self.head_dist
        if head_dist is not None and self._global_pool == "token":
            # DeiT: the class token feeds the classifier, the distillation token (second) its own head.
            x, x_dist = x[:, 0], x[:, 1]
            if pre_logits:
                return (x + x_dist) / 2
            x, x_dist = fc(drop(norm(x))), head_dist(drop(norm(x_dist)))
            # Training returns both logits so the objective can supervise each head.
            return (x, x_dist) if self.training else (x + x_dist) / 2
        x = drop(norm(self.pool(x)))
        if pre_logits:
            return x
        if head_dist is None or not self.distill_from_pooled:
            return fc(x)
        x, x_dist = fc(x), head_dist(x)
        return (x, x_dist) if self.training else (x + x_dist) / 2

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ features
    def _intermediates(self, x: torch.Tensor, take: Sequence[int], norm: bool) -> tuple[torch.Tensor, list[Point]]:
        """``(forward_features(x), points)``: the feature points at ``take`` (``feature_info`` indices)."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._intermediates(x, (), False)[0]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        pyramid: bool = False,
        return_prefix_tokens: bool = False,
    ):
        """Features at the ``feature_info`` points, for dense heads.

        indices: an int n takes the last n points, a list those (negatives count back), None all.
        norm: pass token features through the final norm (where the model has one). Each feature
        is (B, C, H, W) for ``output_fmt="NCHW"`` or (B, H*W, C) for "NLC"; prefix tokens are
        dropped (``return_prefix_tokens`` pairs each with them). Returns ``(forward_features(x),
        features)``, or only the list when ``intermediates_only``.

        pyramid: instead, the four maps :meth:`pyramid_info` lists (strides 4/8/16/32 where the
        model has them; an isotropic model resamples its last map, ViTDet's simple pyramid);
        ``indices`` is then ignored.
        """
        check_output_fmt(output_fmt)
        if pyramid:
            if return_prefix_tokens:
                raise ValueError("pyramid=True returns maps only; it cannot return prefix tokens")
            plan = self._pyramid_plan()
            final, maps = self._pyramid_maps(x, sorted({i for i, _ in plan}), norm)
            feats = build_pyramid(maps, plan)
            if output_fmt == "NLC":
                feats = [map_to_tokens(f) for f in feats]
            return feats if intermediates_only else (final, feats)
        take = take_indices(len(self.feature_info), indices, "feature points")
        final, points = self._intermediates(x, take, norm)
        feats = [self._format(p, output_fmt, return_prefix_tokens) for p in points]
        return feats if intermediates_only else (final, feats)

    @staticmethod
    def _format(p: Point, output_fmt: str, return_prefix_tokens: bool = False):
        if p.grid is None:
            if return_prefix_tokens:
                raise ValueError("this feature point is a map; it has no prefix tokens to return")
            return p.x if output_fmt == "NCHW" else map_to_tokens(p.x)
        prefix, x = p.x[:, :p.prefix], p.x[:, p.prefix:]
        if output_fmt == "NCHW":
            x = tokens_to_map(x, p.grid)
        return (x, prefix) if return_prefix_tokens else x

    # ------------------------------------------------------------------ pyramid
    def _pyramid_sources(self) -> list[dict]:
        """The maps a pyramid level may come from, in depth order (default: ``feature_info``)."""
        return self.feature_info

    def _pyramid_plan(self) -> list[tuple[int, float]]:
        """``(source, scale)`` per level (:func:`vitkit.layers.pyramid.pyramid_plan`)."""
        return pyramid_plan([f["reduction"] for f in self._pyramid_sources()])

    def _pyramid_maps(self, x: torch.Tensor, idx: list[int], norm: bool) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """``forward_features(x)`` and the (B, C, H, W) source maps at ``idx``."""
        final, points = self._intermediates(x, idx, norm)
        return final, {i: self._format(p, "NCHW") for i, p in zip(idx, points)}

    def pyramid_info(self) -> list[dict]:
        """Channels and strides of the four maps ``forward_intermediates(pyramid=True)`` returns;
        ``module`` names each level's source."""
        src = self._pyramid_sources()
        info = []
        for i, scale in self._pyramid_plan():
            r = src[i]["reduction"] / scale
            info.append(dict(num_chs=src[i]["num_chs"], reduction=round(r) if r == round(r) else r, module=src[i]["module"]))
        return info

    # ------------------------------------------------------------------ token families
    def _embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> (B, H'*W', D) patch tokens + a patch-only ``pos_embed`` resampled to the grid.

        For families with ``patch_embed``, ``pos_embed`` (patch rows only) and ``pos_drop``.
        """
        check_image(x, self.in_chans)
        grid = self.patch_embed.dynamic_grid(x.shape[2], x.shape[3])
        pos = resample_abs_pos_embed(self.pos_embed, grid, self.patch_embed.grid_size, num_prefix_tokens=0)
        return self.pos_drop(self.patch_embed(x) + pos), grid

    def _run_blocks(self, blocks, x: torch.Tensor, grid: tuple[int, int], take: Sequence[int], norm: bool,
                    prefix: int = 0) -> tuple[torch.Tensor, list[Point]]:
        """Run ``blocks`` on (B, N, D) tokens, keeping those after the blocks in ``take`` (through ``self.norm`` if ``norm``)."""
        feats = []
        for i, blk in enumerate(blocks):
            x = self.checkpointed(blk, x)
            if i in take:
                feats.append(Point(self.norm(x) if norm else x, grid, prefix))
        return x, feats

    # ------------------------------------------------------------------ training hooks
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward instead of storing them (per block where the family runs blocks)."""
        for m in self.modules():
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = enable

    def checkpointed(self, fn: Callable, *args):
        """``fn(*args)`` under gradient checkpointing when it is on."""
        return checkpoint_if(self.grad_checkpointing, fn, *args)

    # Names (a dotted component of a parameter's name) the optimizer leaves undecayed.
    no_weight_decay_keys: tuple[str, ...] = ()

    def no_weight_decay(self) -> set[str]:
        """Parameters named by ``no_weight_decay_keys`` (norms and biases follow the optimizer's own rule)."""
        keys = set(self.no_weight_decay_keys)
        return {n for n, _ in self.named_parameters() if keys.intersection(n.split("."))}

    def aux_loss(self) -> torch.Tensor:
        """Auxiliary losses of the last forward (the MoE ViT's load balancing); zero on the model's device."""
        return torch.zeros((), device=next(self.parameters()).device)

    # ------------------------------------------------------------------ checkpoints
    # Buffers some checkpoints saved although this family recomputes them from the config.
    recomputed_keys: tuple[str, ...] = ()

    def classifier_names(self) -> list[str]:
        """Where this model's classifiers sit in its state dict (``head``, ``fc``, ``head.fc``, ``head_dist``)."""
        return [self.classifier_name] + (["head_dist"] if self.head_dist is not None else [])

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor], log) -> dict[str, torch.Tensor]:
        """Fit a timm-named state dict to this family (timm's ``checkpoint_filter_fn``, beside each
        family); ``log`` collects what changed in its ``notes``, ``resampled`` and ``dropped`` lists.
        The default drops ``recomputed_keys``."""
        if not self.recomputed_keys:
            return state_dict
        return {k: v for k, v in state_dict.items() if k.rsplit(".", 1)[-1] not in self.recomputed_keys}

class StageBackbone(Backbone):
    """Families whose stages run on the whole token grid (Swin, PVT): ``embed`` -> stages -> final norm.

    A family implements ``embed`` (image -> (B, H*W, C) tokens and their context), ``_stages``
    (yield each stage's (B, H, W, C) map) and ``_final_norm``; ``feature_info`` lists the stages,
    which already are the pyramid.
    """

    pools = ("avg", "")
    stage_attr = "stages"  # the ModuleList / Sequential of stages, each with .downsample and .blocks

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

    def _pyramid_plan(self) -> list[tuple[int, float]]:
        return [(i, 1.0) for i in range(len(self.feature_info))]

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        ctx,
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

    def _intermediates(self, x: torch.Tensor, take, norm: bool) -> tuple[torch.Tensor, list[Point]]:
        """Stage maps; ``norm`` applies the final norm to the last one (the only one it was trained on)."""
        last = len(self.feature_info) - 1
        feats = []
        for i, stage_map in enumerate(self._stages(*self.embed(x))):
            if i in take:
                f = self._final_norm(stage_map) if norm and i == last else stage_map
                feats.append(Point(f.flatten(1, 2), tuple(f.shape[1:3])))
        return self._final_norm(stage_map).flatten(1, 2), feats
