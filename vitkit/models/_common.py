"""Pieces of the backbone API that every non-ViT family shares: input checks, index selection."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..layers.pyramid import PYRAMID_STRIDES, build_pyramid, pyramid_plan
from ._registry import ModelCard, register_model


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


def take_indices(count: int, indices: int | list[int] | tuple[int, ...] | None, what: str = "blocks") -> list[int]:
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
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid).contiguous()


class PyramidMixin:
    """``pyramid_info`` and ``forward_intermediates(pyramid=True)`` from a family's feature maps."""

    def _pyramid_sources(self) -> list[dict]:
        """The maps a pyramid level may come from, in depth order (default: ``feature_info``)."""
        return self.feature_info

    def _pyramid_plan(self) -> list[tuple[int, float]]:
        return pyramid_plan([f["reduction"] for f in self._pyramid_sources()])

    def pyramid_info(self) -> list[dict]:
        """Channels and strides of the four maps ``forward_intermediates(pyramid=True)`` returns.

        Strides 4, 8, 16 and 32; each level is the deepest map at its stride, or the nearest
        one resampled (:func:`vitkit.layers.pyramid.pyramid_plan`); ``module`` names its source.
        """
        src = self._pyramid_sources()
        return [dict(num_chs=src[i]["num_chs"], reduction=s, module=src[i]["module"])
                for (i, _), s in zip(self._pyramid_plan(), PYRAMID_STRIDES)]

    def _pyramid_intermediates(self, x: torch.Tensor, norm: bool, output_fmt: str, intermediates_only: bool):
        """``forward_intermediates(pyramid=True)`` for a family whose sources are ``feature_info``."""
        check_output_fmt(output_fmt)
        plan = self._pyramid_plan()
        idx = sorted({i for i, _ in plan})
        final, maps = self.forward_intermediates(x, indices=idx, norm=norm, output_fmt="NCHW")
        return finish_pyramid(final, dict(zip(idx, maps)), plan, output_fmt, intermediates_only)


class BackboneMixin(PyramidMixin):
    """Defaults of the backbone API that no family here needs to change."""

    def aux_loss(self) -> torch.Tensor:
        """No auxiliary losses (the MoE ViT has one); zero on the model's device."""
        return torch.zeros((), device=next(self.parameters()).device)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head


def finish_pyramid(final: torch.Tensor, maps: dict[int, torch.Tensor], plan: list[tuple[int, float]],
                   output_fmt: str, intermediates_only: bool):
    """The pyramid levels of ``plan`` in ``output_fmt``, after ``final`` unless ``intermediates_only``."""
    levels = build_pyramid(maps, plan)
    if output_fmt == "NLC":
        levels = [map_to_tokens(f) for f in levels]
    return levels if intermediates_only else (final, levels)


def distilled_logits(head: nn.Module, head_dist: nn.Module | None, x: torch.Tensor, training: bool):
    """Logits of a classifier head, or of a classifier and a distillation head.

    Training returns both so a distillation objective can supervise each; eval their mean.
    """
    if head_dist is None:
        return head(x)
    x, x_dist = head(x), head_dist(x)
    return (x, x_dist) if training else (x + x_dist) / 2


def register_variant(build: Callable[..., nn.Module], name: str, family: str, config: dict, img: int = 224,
                     **card) -> None:
    """Register ``name``: ``build(**config, img_size=img)`` with a card for ``img`` px inputs."""
    card = ModelCard(name=name, family=family, input_size=(3, img, img), config=dict(config, img_size=img), **card)
    register_model(card)(lambda **kwargs: build(**kwargs))
