"""Full-resolution dense inference: the whole image at once, or sliding windows averaged."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError


def _pair(window: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(window, int):
        window = (window, window)
    h, w = (int(v) for v in window)
    if h < 1 or w < 1:
        raise ConfigError(f"the sliding window must be positive, got {tuple(window)}: give its size in pixels, e.g. 512")
    return h, w


def _starts(size: int, crop: int, stride: int) -> list[int]:
    # mmseg's slide_inference grid: windows every `stride` pixels, the last one flush with the border.
    n = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + crop, size) - crop, 0) for i in range(n)})


@torch.no_grad()
def dense_predict(
    model: nn.Module,
    images: Tensor,
    window: int | tuple[int, int] | None = None,
    overlap: float = 1 / 3,
) -> Tensor:
    """Per-pixel outputs of ``model`` on ``images`` (B, C, H, W) at their full resolution.

    ``model`` maps (B, C, h, w) to (B, out, h, w) at its input size (a
    :class:`~vitkit.dense.DenseModel` pads to its stride and crops back itself). With ``window``
    None, or a window covering the image, the image goes through the model whole and the result
    is exactly ``model(images)``. Otherwise the image is cut into ``window``-sized crops every
    ``window * (1 - overlap)`` pixels, the last crop flush with the border (mmseg's
    ``slide_inference``); each pixel's output is the mean over the crops that contain it.

    Returns:
        (B, out, H, W) float tensor: segmentation logits, or depth.
    """
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"the sliding-window overlap must be in [0, 1), got {overlap}: 1/3 is the usual choice")
    if images.ndim != 4:
        raise ConfigError(f"dense_predict takes images of shape (B, C, H, W), got {tuple(images.shape)}")
    H, W = images.shape[-2:]
    if window is None:
        return model(images)
    wh, ww = _pair(window)
    if wh >= H and ww >= W:
        return model(images)
    wh, ww = min(wh, H), min(ww, W)
    sh, sw = max(1, int(wh * (1 - overlap))), max(1, int(ww * (1 - overlap)))
    out = None
    count = images.new_zeros(1, 1, H, W, dtype=torch.float32)
    for y in _starts(H, wh, sh):
        for x in _starts(W, ww, sw):
            pred = model(images[:, :, y : y + wh, x : x + ww]).float()
            if out is None:
                out = images.new_zeros(images.shape[0], pred.shape[1], H, W, dtype=torch.float32)
            out[:, :, y : y + wh, x : x + ww] += pred
            count[:, :, y : y + wh, x : x + ww] += 1
    return out / count
