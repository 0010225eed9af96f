"""Capture attention weights from the attention layers of a model.

The protocol every vitkit attention layer follows: a layer holds ``captured`` (None normally).
While it is None the layer runs the fused SDPA kernel. While it holds a sink, the layer
computes through :func:`attend`, which also forms the explicit softmax(QK^T) weights and hands
them to ``sink.append(weights, layout)``; the layer's output is still the fused kernel's,
bit-identical. ``layout`` is None for global attention; a windowed layer passes a
:class:`WindowLayout` so the weights can be mapped back to image coordinates. A new attention
layer joins capture, rollout and the explain tools by holding ``captured`` and calling
:func:`attend`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class WindowLayout:
    """How a windowed layer's (B * windows, heads, w*w, w*w) weights sit in the image.

    grid: the (H', W') token grid the windows tile (after padding to whole windows).
    window: the (h, w) window size in tokens.
    shift: the cyclic shift (rows, cols) applied before partitioning (0, 0 for none).
    size: the (H', W') grid before padding; defaults to ``grid``.
    """

    grid: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int] = (0, 0)
    size: tuple[int, int] | None = None


def capturable_modules(model: nn.Module) -> list[nn.Module]:
    """The attention layers of ``model`` that follow the capture protocol, in forward order."""
    return [m for m in model.modules() if hasattr(m, "captured") and callable(getattr(m, "forward", None))]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink=None,
    attn_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    layout: WindowLayout | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for (B, heads, N, d) queries and (B, heads, M, d) keys and
    values, on the fused kernel; ``scale`` defaults to 1/sqrt(d).

    With a ``sink``, the weights (B, heads, N, N) are also formed and appended to it (detached
    unless ``sink.keep_graph``). The returned value is still the fused kernel's, so capture
    never changes a model's outputs. With ``keep_graph`` the gradient flows through the
    explicit weights instead (value + (manual - manual) is the value exactly, and its gradient
    is the manual path's), so d(output)/d(weights) exists for gradient-weighted rollout.
    """
    if sink is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=scale)
    attn = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1)  # (B, heads, N, M)
    if attn_bias is not None:
        attn = attn + attn_bias
    attn = attn.softmax(dim=-1)
    keep_graph = getattr(sink, "keep_graph", False)
    sink.append(attn if keep_graph else attn.detach(), layout)
    if dropout_p > 0:
        # Dropout draws differ between the two paths: the output follows the captured weights.
        return F.dropout(attn, dropout_p) @ v
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)
    if keep_graph:
        manual = attn @ v
        return fused.detach() + (manual - manual.detach())
    return fused


class _MapList(list):
    """A plain list sink: detached weights, one per attention call."""

    keep_graph = False

    def append(self, weights: torch.Tensor, layout: WindowLayout | None = None) -> None:
        super().append(weights)


@contextmanager
def record_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, each forward appends (B, heads, N, N) weights per attention layer.

    The low-level form; :func:`vitkit.interpret.capture_attention` chooses layers and heads,
    keeps the graph, and maps windows back to the image.

    >>> with record_attention(model) as maps:
    ...     model(x)
    >>> len(maps) == depth
    """
    maps = _MapList()
    modules = capturable_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no vitkit attention layers to capture")
    for m in modules:
        m.captured = maps
    try:
        yield maps
    finally:
        for m in modules:
            m.captured = None


def capture_attention(model: nn.Module):
    """Deprecated name of :func:`record_attention` (it clashed with :func:`vitkit.interpret.capture_attention`)."""
    warnings.warn(
        "vitkit.layers.capture_attention is renamed vitkit.layers.record_attention; "
        "vitkit.interpret.capture_attention is the documented capture tool",
        DeprecationWarning,
        stacklevel=2,
    )
    return record_attention(model)
