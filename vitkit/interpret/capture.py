"""Attention weights of chosen layers for one forward pass.

Only the layers asked for switch to the explicit-weights path, and only for the call; the
model's outputs stay those of the fused kernel, bit for bit. A layer that attends in windows
(Swin) hands its weights over with a :class:`~vitkit.layers.capture.WindowLayout`, and they
come back here as (B, heads, N, N) over the image's tokens, like a global layer's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import ConfigError
from ..layers.capture import WindowLayout, capturable_modules


class AttentionMaps(list):
    """Per-layer attention weights, (B, heads, N, N) each (heads is 1 when averaged).

    Attributes:
        layers: the index of each map among the model's attention layers.
        output: the model's output for the call (logits), with its graph when ``keep_graph``.
        num_prefix_tokens: tokens before the patches (class, distillation, register tokens).
        grid: the (H', W') patch grid of the input.
    """

    layers: list[int]
    output: torch.Tensor | None = None
    num_prefix_tokens: int = 0
    grid: tuple[int, int] | None = None

    def _put(self, slot: int, weights: torch.Tensor) -> None:
        self._slots = {**getattr(self, "_slots", {}), slot: weights}
        self[:] = [self._slots[k] for k in sorted(self._slots)]


def _in_backward() -> bool:
    """True while the autograd engine runs: a checkpointed block recomputing its forward."""
    return torch._C._current_graph_task_id() != -1


class _LayerSink:
    """What one attention layer hands its weights to during a capture.

    A forward replaces the layer's map; the recomputation that gradient checkpointing runs
    inside the backward pass is ignored, so each layer gives one map per forward.
    """

    def __init__(self, maps: AttentionMaps, slot: int, keep_graph: bool, heads, average_heads: bool, device):
        self.maps, self.slot, self.keep_graph = maps, slot, keep_graph
        self.heads, self.average_heads, self.device = heads, average_heads, device

    def append(self, weights: torch.Tensor, layout: WindowLayout | None = None) -> None:
        if _in_backward():
            return
        if layout is not None:
            weights = windows_to_image(weights, layout)
        if self.heads is not None:
            if max(self.heads) >= weights.shape[1] or min(self.heads) < -weights.shape[1]:
                raise ConfigError(f"heads {self.heads} out of range: the layer has {weights.shape[1]} heads")
            weights = weights[:, self.heads]
        if self.average_heads:
            weights = weights.mean(dim=1, keepdim=True)
        self.maps._put(self.slot, weights.to(self.device) if self.device is not None else weights)


def windows_to_image(weights: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """(B * nW, heads, h*w, h*w) window weights -> (B, heads, H'*W', H'*W') in image order.

    Each query row holds its window's weights at the keys' image positions and zeros
    elsewhere. The shift is undone (a token at rolled position p sits at p + shift), padded
    tokens are dropped and each row is renormalised over the keys that remain.
    """
    (H, W), (h, w), (sh, sw) = layout.grid, layout.window, layout.shift
    if H % h or W % w:
        raise ValueError(f"grid {layout.grid} is not tiled by whole windows of {layout.window}")
    nW = (H // h) * (W // w)
    Bn, heads, n, _ = weights.shape
    if n != h * w or Bn % nW:
        raise ValueError(f"window weights {tuple(weights.shape)} do not fit {nW} windows of {h}x{w} on {layout.grid}")
    B = Bn // nW
    # Image index of every token of every window, in the window partition's order.
    rows = (torch.arange(H).reshape(H // h, 1, h, 1) + sh) % H
    cols = (torch.arange(W).reshape(1, W // w, 1, w) + sw) % W
    index = (rows * W + cols).reshape(nW, h * w).to(weights.device)  # (nW, h*w)
    weights = weights.reshape(B, nW, heads, n, n).permute(0, 2, 1, 3, 4)  # (B, heads, nW, n, n)
    full = weights.new_zeros(B, heads, nW, n, H * W)
    full = full.scatter(-1, index[None, None, :, None, :].expand(B, heads, nW, n, n), weights)
    out = weights.new_zeros(B, heads, H * W, H * W)
    out = out.index_copy(2, index.reshape(-1), full.reshape(B, heads, nW * n, H * W))
    size = layout.size or layout.grid
    if tuple(size) != (H, W):
        keep = (torch.arange(H)[:, None] < size[0]) & (torch.arange(W)[None] < size[1])
        keep = keep.reshape(-1).nonzero().squeeze(1).to(weights.device)
        out = out[:, :, keep][..., keep]
        out = out / out.sum(-1, keepdim=True).clamp_min(1e-12)
    return out


def _select(model: nn.Module, layers: int | Sequence[int] | None) -> list[int]:
    modules = capturable_modules(model)
    if not modules:
        raise ConfigError(
            f"{type(model).__name__} has no attention layers that vitkit can capture "
            "(vitkit attention layers hold a `captured` sink; see vitkit.layers.capture)"
        )
    n = len(modules)
    if layers is None:
        return list(range(n))
    chosen = [layers] if isinstance(layers, int) else list(layers)
    bad = [i for i in chosen if not -n <= i < n]
    if bad or not chosen:
        raise ConfigError(f"layers {chosen} out of range: the model has {n} attention layers (0..{n - 1}, or negative)")
    return sorted({i % n for i in chosen})


@contextmanager
def attention_capture(
    model: nn.Module,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    *,
    keep_graph: bool = False,
    average_heads: bool = False,
    device: str | torch.device | None = None,
) -> Iterator[AttentionMaps]:
    """Capture while the block runs; the maps fill in as the chosen layers run.

    For use inside a training step or around a backward pass (gradient checkpointing
    re-runs layers in the backward; each layer still gives one map). Arguments as in
    :func:`capture_attention`. The list is empty until a forward runs, then holds each chosen
    layer's map from the latest forward.
    """
    chosen = _select(model, layers)
    head_list = None if heads is None else ([heads] if isinstance(heads, int) else list(heads))
    modules = capturable_modules(model)
    maps = AttentionMaps()
    maps.layers = chosen
    for slot, i in enumerate(chosen):
        modules[i].captured = _LayerSink(maps, slot, keep_graph, head_list, average_heads, device)
    try:
        yield maps
    finally:
        for i in chosen:
            modules[i].captured = None


def capture_attention(
    model: nn.Module,
    images: torch.Tensor,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    *,
    keep_graph: bool = False,
    average_heads: bool = False,
    device: str | torch.device | None = None,
) -> AttentionMaps:
    """Run ``model(images)`` once and return the attention weights of the chosen layers.

    Args:
        model: any vitkit model whose attention layers follow the capture protocol.
        images: (B, C, H, W), normalised as the model expects.
        layers: attention-layer indices in forward order (negative from the end); None: all.
        heads: head indices to keep; None: all.
        keep_graph: keep the maps in the autograd graph with ``output`` (for gradient-weighted
            rollout); otherwise the forward runs without gradients.
        average_heads: average over the kept heads (maps become (B, 1, N, N)).
        device: move each map there as it is captured (e.g. "cpu" to spare GPU memory).

    Returns:
        :class:`AttentionMaps`: a list with one (B, heads, N, N) tensor per chosen layer, rows
        summing to 1, plus the model output, prefix-token count and patch grid.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"images must be a (B, C, H, W) tensor, got {shape}")
    checkpointing = bool(getattr(model, "grad_checkpointing", False))
    if keep_graph and checkpointing:
        # A kept graph is used after this call, when the layers are fused again; a checkpointed
        # block would then recompute on the other path. Keep the graph whole for this call.
        model.set_grad_checkpointing(False)
    try:
        with attention_capture(
            model, layers, heads, keep_graph=keep_graph, average_heads=average_heads, device=device
        ) as maps, torch.set_grad_enabled(keep_graph):
            output = model(images)
    finally:
        if keep_graph and checkpointing:
            model.set_grad_checkpointing(True)
    maps.output = output
    maps.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
    maps.grid = patch_grid(model, images)
    return maps


def patch_grid(model: nn.Module, images: torch.Tensor) -> tuple[int, int] | None:
    """The (H', W') patch grid ``model`` cuts ``images`` into (None for a model without one)."""
    grid = getattr(getattr(model, "patch_embed", None), "dynamic_grid", None)
    return tuple(grid(images.shape[2], images.shape[3])) if grid is not None else None
