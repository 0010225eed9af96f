"""Local windows for windowed attention: the size rule, partition / reverse, and the shift mask."""

from __future__ import annotations

from functools import lru_cache

import torch


def window_and_shift(
    resolution: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The window and shift a block uses on a map of ``resolution``, per axis.

    Rule: the window never exceeds the map (window = min(window, size)), and an axis whose map
    fits in one window is not shifted (a shift would only wrap the map onto itself). So a
    224 px model runs unchanged at 32 px: the last stages attend globally over their few tokens.
    """
    win = tuple(min(w, r) for w, r in zip(window, resolution, strict=True))
    sh = tuple(0 if r <= w else s for r, w, s in zip(resolution, win, shift, strict=True))
    return win, sh


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of the window -> (B * nW, wh * ww, C), windows row-major."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)  # (B, nH, nW, wh, ww, C)
    return x.reshape(-1, wh * ww, C)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """(B * nW, wh * ww, C) -> (B, H, W, C), the inverse of :func:`window_partition`."""
    wh, ww = window
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)  # (B, nH, wh, nW, ww, C)
    return x.reshape(-1, H, W, C)


@lru_cache(maxsize=64)
def _window_mask(
    size: tuple[int, int], padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]
) -> torch.Tensor | None:
    H, W = size
    Hp, Wp = padded
    if not any(shift) and (H, W) == (Hp, Wp):
        return None
    # Region ids on the padded, shifted map: tokens attend only within their region, so a
    # window that wraps round the map does not mix its far edges.
    region = torch.zeros(Hp, Wp)
    cnt = 0
    for hs in ((0, Hp - window[0]), (Hp - window[0], Hp - shift[0]), (Hp - shift[0], Hp)):
        for ws in ((0, Wp - window[1]), (Wp - window[1], Wp - shift[1]), (Wp - shift[1], Wp)):
            region[hs[0]:hs[1], ws[0]:ws[1]] = cnt
            cnt += 1
    # Padding tokens are never keys: they carry no image content.
    valid = torch.zeros(Hp, Wp, dtype=torch.bool)
    valid[:H, :W] = True
    valid = torch.roll(valid, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    region = window_partition(region[None, :, :, None], window)[..., 0]  # (nW, N)
    valid = window_partition(valid[None, :, :, None], window)[..., 0]  # (nW, N)
    blocked = (region[:, :, None] != region[:, None, :]) | ~valid[:, None, :]  # (nW, N queries, N keys)
    # -100, not -inf: a window made only of padding keeps a finite (discarded) softmax.
    return torch.zeros(blocked.shape).masked_fill(blocked, -100.0)


def window_mask(
    size: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> torch.Tensor | None:
    """(nW, N, N) additive mask (0 or -100) for windows of a map of ``size`` padded to whole
    windows and rolled by -shift; None when there is neither a shift nor padding."""
    padded = tuple(-(-s // w) * w for s, w in zip(size, window, strict=True))
    args = (tuple(size), padded, tuple(window), tuple(shift))
    # Under torch.compile / torch.export the tensors are traced ones: build the mask in the
    # graph and never cache it (a cached traced tensor would break the next eager call).
    mask = _window_mask.__wrapped__(*args) if torch.compiler.is_compiling() else _window_mask(*args)
    return None if mask is None else mask.to(device)
