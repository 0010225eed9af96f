"""Several augmented views of one image, for self-supervised pretraining (DINO, SimCLR, MoCo v3, iBOT).

Two halves, like the supervised pipeline:

- :class:`MultiCrop` runs per sample in the loader workers: random-resized crops (``n_global``
  at the global size, ``n_local`` at the local size) with flips, each crop drawn independently
  from the sample's seeded ``random.Random``; it returns a list of uint8 (C, H, W) tensors that
  the loader collates into ``batch["views"]`` (one (B, C, H_v, W_v) tensor per view).
- :class:`ViewAugment` runs batched on the training device: per view its own
  :class:`ViewStyle` (colour jitter, grayscale, Gaussian blur, solarize, each with its
  probability), every draw per sample, then normalisation.

Presets: :func:`dino_styles` (BYOL/DINO asymmetric blur and solarize), :func:`simclr_styles`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .augment import Normalize, _to_float
from .transforms import TrainTransform

_GRAY = (0.299, 0.587, 0.114)


class MultiCrop:
    """Per-sample crops: ``n_global`` views at ``global_size`` then ``n_local`` at ``local_size``.

    Args:
        global_size, local_size: output sides (local crops are usually ~0.4-0.5 of the global side).
        in_chans: 1 or 3.
        global_scale, local_scale: area ranges of the crops as a fraction of the image.
        hflip: flip probability per view.
    """

    def __init__(
        self,
        global_size: int,
        local_size: int | None = None,
        n_global: int = 2,
        n_local: int = 0,
        in_chans: int = 3,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        hflip: float = 0.5,
    ):
        if n_global < 1 or n_local < 0:
            raise ValueError(f"need n_global >= 1 and n_local >= 0, got {n_global} and {n_local}")
        local_size = local_size or max(8, global_size * 3 // 7)
        self.n_global, self.n_local = n_global, n_local
        self.global_crop = TrainTransform(global_size, in_chans, scale=tuple(global_scale), hflip=hflip)
        self.local_crop = TrainTransform(local_size, in_chans, scale=tuple(local_scale), hflip=hflip)

    def __call__(self, img, rng: random.Random | None = None) -> list[torch.Tensor]:
        rng = rng if rng is not None else random.Random()
        return [self.global_crop(img, rng) for _ in range(self.n_global)] + [
            self.local_crop(img, rng) for _ in range(self.n_local)
        ]

    def __repr__(self) -> str:
        return f"MultiCrop(global={self.global_crop.size} x{self.n_global}, local={self.local_crop.size} x{self.n_local})"


@dataclass
class ViewStyle:
    """The photometric augmentation of one view; each op is applied to a sample with its probability.

    Jitter factors are uniform in ``[1 - s, 1 + s]`` (brightness, contrast, saturation) and the
    hue shift in ``[-hue, hue]`` of a full turn. Blur sigma is drawn in ``blur_sigma`` times
    the image side / 224, so a 32 px image is blurred as much as a 224 px one relative to its size.
    """

    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0


def dino_styles(n_local: int = 0) -> list[ViewStyle]:
    """DINO/BYOL: global view 1 always blurred, global view 2 rarely blurred and sometimes solarized,
    local views blurred half the time."""
    return [ViewStyle(blur_prob=1.0), ViewStyle(blur_prob=0.1, solarize_prob=0.2)] + [
        ViewStyle(blur_prob=0.5) for _ in range(n_local)
    ]


def simclr_styles(n_views: int = 2, blur_prob: float = 0.5) -> list[ViewStyle]:
    """SimCLR: strong colour jitter (0.8, 0.8, 0.8, 0.2), grayscale 0.2, blur ``blur_prob``, every view alike."""
    return [ViewStyle(0.8, 0.8, 0.8, 0.8, 0.2, 0.2, blur_prob=blur_prob) for _ in range(n_views)]


def _draw(b: int, p: float, device) -> torch.Tensor:
    """(B, 1, 1, 1) bool: which samples get an op of probability ``p``."""
    return (torch.rand(b, 1, 1, 1, device=device) < p)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype)
    return torch.einsum("bchw,c->bhw", x, w).unsqueeze(1)  # (B, 1, H, W)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of [0, 1] RGB (B, 3, H, W) by ``shift`` (B,) turns, in YIQ space (luma kept).

    Positive shifts go the way of HSV hue (red towards yellow and green).
    """
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          device=x.device, dtype=x.dtype)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    theta = -2 * math.pi * shift.view(-1, 1, 1)  # YIQ's hue angle runs against HSV's
    cos, sin = theta.cos(), theta.sin()
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq).clamp(0, 1)


def color_jitter_full(x: torch.Tensor, style: ViewStyle) -> torch.Tensor:
    """Brightness, contrast, saturation, hue (in that order), per-sample factors, on [0, 1] images."""
    b, c = x.shape[:2]

    def factor(s: float) -> torch.Tensor:
        return (1 - s + 2 * s * torch.rand(b, 1, 1, 1, device=x.device)).clamp_min(0)

    x = (x * factor(style.brightness)).clamp(0, 1)
    x = torch.lerp(_gray(x).mean((2, 3), keepdim=True), x, factor(style.contrast)).clamp(0, 1)
    if c == 3:
        x = torch.lerp(_gray(x), x, factor(style.saturation)).clamp(0, 1)
        if style.hue > 0:
            x = adjust_hue(x, (torch.rand(b, device=x.device) * 2 - 1) * style.hue)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each sample of (B, C, H, W) with its own ``sigma`` (B,) pixels: separable, reflect padding."""
    b, c, h, w = x.shape
    radius = max(1, min(math.ceil(3 * float(sigma.max())), (min(h, w) - 1) // 2 or 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)  # (B, K)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K): one kernel per sample and channel
    y = x.reshape(1, b * c, h, w)
    pad = "reflect" if min(h, w) > radius else "replicate"
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode=pad), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode=pad), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment_view(x: torch.Tensor, style: ViewStyle) -> torch.Tensor:
    """[0, 1] float (B, C, H, W) -> the view ``style`` describes, each op drawn per sample."""
    b, c, h, w = x.shape
    dev = x.device
    if style.jitter_prob > 0:
        x = torch.where(_draw(b, style.jitter_prob, dev), color_jitter_full(x, style), x)
    if style.gray_prob > 0 and c == 3:
        x = torch.where(_draw(b, style.gray_prob, dev), _gray(x).expand(-1, 3, -1, -1), x)
    if style.blur_prob > 0:
        lo, hi = (s * max(h, w) / 224 for s in style.blur_sigma)
        sigma = lo + (hi - lo) * torch.rand(b, device=dev)
        x = torch.where(_draw(b, style.blur_prob, dev), gaussian_blur(x, sigma.clamp_min(1e-3)), x)
    if style.solarize_prob > 0:
        x = torch.where(_draw(b, style.solarize_prob, dev), torch.where(x < 0.5, x, 1 - x), x)
    return x


class ViewAugment(Normalize):
    """Batched, per-view augmentation of ``batch["views"]`` (uint8 list) -> normalised float views.

    ``styles[i]`` augments view i; views beyond the list reuse its last style. ``batch["image"]``,
    when present, is only normalised.
    """

    def __init__(self, styles: Sequence[ViewStyle], mean=None, std=None):
        kw = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
        super().__init__(**kw)
        if not styles:
            raise ValueError("ViewAugment needs at least one ViewStyle")
        self.styles = list(styles)

    def forward(self, batch: dict) -> dict:
        out = dict(batch)
        if "image" in batch:
            out["image"] = self.normalize(batch["image"])
        if "views" in batch:
            out["views"] = [
                self.normalize(augment_view(_to_float(v), self.styles[min(i, len(self.styles) - 1)]))
                for i, v in enumerate(batch["views"])
            ]
        return out

