"""Batched, on-device normalisation, colour jitter and random erasing of uint8 batches.

The DataLoader workers crop, flip and RandAugment each image (:mod:`vitkit.data.transforms`)
and hand over uint8 (B, C, H, W). Here, on the training device, each batch is converted to
float, colour-jittered, normalised and randomly erased. Every random choice is per sample (and
per view), drawn from torch's generator on the batch's device, whose state the trainer
checkpoints, so a resumed run repeats them bitwise.

A batch dict may carry ``"image"``, ``"views"`` (a list of uint8 (B, C, H_v, W_v) tensors of
any sizes) or both; each tensor is augmented with its own draws.

On the batched path the crops, flips and RandAugment run here too, first
(:class:`TrainAugment` with a ``geometry``), on images decoded once at a fixed size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RE_MODES = ("pixel", "const")


def _per_channel(values: Sequence[float], channels: int, what: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1 and len(values) == 3:
        return [sum(values) / 3]  # RGB statistics applied to a grayscale model: their average
    raise ValueError(f"{what} has {len(values)} values but the images have {channels} channels")


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _map_images(batch: dict, fn) -> dict:
    """Apply ``fn`` to ``batch["image"]`` and to every tensor of ``batch["views"]``, where present."""
    out = dict(batch)
    if "image" in batch:
        out["image"] = fn(batch["image"])
    if "views" in batch:
        out["views"] = [fn(v) for v in batch["views"]]
    return out


def _uniform(lo: float, hi: float, shape, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, device=device)


def erase_boxes(
    b: int, h: int, w: int, prob: float, area: tuple[float, float], ratio: tuple[float, float], device=None
) -> torch.Tensor:
    """Per-sample erasing masks, bool (B, 1, H, W).

    Each sample is erased with probability ``prob``: up to 10 attempts draw a target area
    (``area`` fraction of the image, uniform) and an aspect ratio h/w (log-uniform in ``ratio``);
    the first box that fits strictly inside the image is placed uniformly. A sample whose 10
    attempts all fail is left as it is.
    """
    attempts = 10
    target = _uniform(area[0], area[1], (b, attempts), device) * (h * w)
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), (b, attempts), device))
    eh = torch.round(torch.sqrt(target * aspect)).long()  # (B, attempts)
    ew = torch.round(torch.sqrt(target / aspect)).long()
    fits = (eh < h) & (ew < w)
    first = fits.int().argmax(1, keepdim=True)  # (B, 1): index of the first fitting attempt
    eh, ew = eh.gather(1, first), ew.gather(1, first)  # (B, 1)
    apply = (torch.rand(b, 1, device=device) < prob) & fits.any(1, keepdim=True)
    top = (torch.rand(b, 1, device=device) * (h - eh + 1)).floor().long()
    left = (torch.rand(b, 1, device=device) * (w - ew + 1)).floor().long()
    rows = torch.arange(h, device=device).view(1, h)
    cols = torch.arange(w, device=device).view(1, w)
    in_rows = (rows >= top) & (rows < top + eh) & apply  # (B, H)
    in_cols = (cols >= left) & (cols < left + ew)  # (B, W)
    return (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # (B, 1, H, W)


def random_erase(
    x: torch.Tensor,
    prob: float = 0.25,
    mode: str = "pixel",
    area: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
    inplace: bool = False,
) -> torch.Tensor:
    """Randomly erase one box per sample of a normalised float (B, C, H, W) batch.

    The defaults are Random Erasing's (Zhong et al.) as timm's ``RandomErasing`` has them: an
    area of 2% to 1/3 of the image, an aspect ratio h/w from 0.3 to 1/0.3.

    ``mode="pixel"`` fills the box with per-pixel, per-channel N(0, 1) noise (random values in
    the normalised space); ``"const"`` fills it with 0 (the dataset mean).
    """
    if mode not in _RE_MODES:
        raise ValueError(f"random erasing mode must be one of {_RE_MODES}, got {mode!r}")
    b, c, h, w = x.shape
    mask = erase_boxes(b, h, w, prob, area, ratio, x.device)
    hit = mask.flatten(1).any(1).nonzero().squeeze(1)  # the erased samples: noise only for them
    if len(hit) == 0:
        return x
    fill = torch.randn(len(hit), c, h, w, device=x.device, dtype=x.dtype) if mode == "pixel" else 0.0
    x = x if inplace else x.clone()
    x[hit] = torch.where(mask[hit], fill, x[hit])
    return x


def color_jitter(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-sample brightness, contrast and saturation jitter of a [0, 1] float (B, C, H, W) batch.

    Each factor is uniform in ``[max(0, 1 - strength), 1 + strength]`` and the three are applied
    in a random order per sample. Each is a blend ``f * x + (1 - f) * ref`` clamped to [0, 1]:
    brightness blends with black (it multiplies), contrast with the image's mean gray,
    saturation with its gray version (the identity on 1-channel images).
    """
    b, c = x.shape[:2]
    factors = _uniform(max(0.0, 1 - strength), 1 + strength, (b, 3), x.device)
    order = torch.rand(b, 3, device=x.device).argsort(1)  # (B, 3): a random permutation per sample
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device)
    for step in range(3):
        op = order[:, step].view(b, 1, 1, 1)
        f = factors.gather(1, order[:, step : step + 1]).view(b, 1, 1, 1)
        gray = x if c == 1 else torch.einsum("bchw,c->bhw", x, weights).unsqueeze(1)  # (B, 1, H, W)
        ref = torch.where(op == 2, gray, torch.where(op == 1, gray.mean((2, 3), keepdim=True), 0.0))
        x = torch.lerp(ref, x, f).clamp_(0, 1)  # ref + f * (x - ref)
    return x


class Normalize(nn.Module):
    """uint8 or float-in-[0, 1] batch → float ``(x - mean) / std``.

    Accepts a tensor, or a batch dict whose ``"image"`` and/or ``"views"`` it normalises.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.mean, self.std = tuple(mean), tuple(std)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 or float → float32 normalised (B, C, H, W)."""
        c = x.shape[1]
        mean = torch.tensor(_per_channel(self.mean, c, "mean"), device=x.device).view(1, c, 1, 1)
        std = torch.tensor(_per_channel(self.std, c, "std"), device=x.device).view(1, c, 1, 1)
        scale = 1 / (255 * std) if x.dtype == torch.uint8 else 1 / std
        return torch.addcmul(-mean / std, x.float(), scale)  # one pass: x * scale - mean / std

    def forward(self, batch):
        if isinstance(batch, torch.Tensor):
            return self.normalize(batch)
        return _map_images(batch, self.normalize)


class BatchAugment(Normalize):
    """Batched train augmentation: uint8 (B, C, H, W) → float normalised (B, C, H, W).

    Order: colour jitter on [0, 1] images, normalisation, then random erasing, every draw per
    sample and per view. (RandAugment runs earlier, per image in the loader workers.)

    Args:
        mean, std: normalisation statistics (per channel, or RGB averaged for 1 channel).
        color_jitter: brightness/contrast/saturation strength; 0 disables it.
        re_prob: per-image probability of random erasing; 0 disables it.
        re_mode: ``"pixel"`` (per-pixel N(0, 1) noise) or ``"const"`` (zeros, the mean).
        keep_raw: also return the un-normalised [0, 1] images (after colour jitter, before
            erasing) as ``"image_raw"`` / ``"views_raw"``, for objectives that normalise
            differently (e.g. a teacher trained with other statistics).
        device: where to run; the batch is moved there.
    """

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        color_jitter: float = 0.0,
        re_prob: float = 0.25,
        re_mode: str = "pixel",
        keep_raw: bool = False,
        device: torch.device | str | None = None,
    ):
        super().__init__(mean, std)
        if re_mode not in _RE_MODES:
            raise ValueError(f"re_mode must be one of {_RE_MODES}, got {re_mode!r}")
        if not 0 <= re_prob <= 1:
            raise ValueError(f"re_prob must be in [0, 1], got {re_prob}")
        self.color_jitter, self.re_prob, self.re_mode = color_jitter, re_prob, re_mode
        self.keep_raw = keep_raw
        self.device = torch.device(device) if device is not None else None

    def augment_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, H, W) uint8 → (augmented and normalised, un-normalised [0, 1] or None).

        The [0, 1] image is materialised only when colour jitter or ``keep_raw`` needs it.
        """
        if self.device is not None:
            x = x.to(self.device, non_blocking=True)
        raw = None
        if self.color_jitter > 0 or self.keep_raw:
            raw = _to_float(x)
            if self.color_jitter > 0:
                raw = color_jitter(raw, self.color_jitter)
        out = self.normalize(x if raw is None else raw)
        if self.re_prob > 0:
            out = random_erase(out, self.re_prob, self.re_mode, inplace=True)  # out is ours
        return out, raw

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 → (B, C, H, W) float32 augmented and normalised."""
        return self.augment_raw(x)[0]

    def forward(self, batch):
        if isinstance(batch, torch.Tensor):
            return self.augment(batch)
        out = dict(batch)
        if "image" in batch:
            out["image"], raw = self.augment_raw(batch["image"])
            if self.keep_raw:
                out["image_raw"] = raw
        if "views" in batch:
            pairs = [self.augment_raw(v) for v in batch["views"]]
            out["views"] = [p[0] for p in pairs]
            if self.keep_raw:
                out["views_raw"] = [p[1] for p in pairs]
        return out


class TrainAugment(nn.Module):
    """A train batch of uint8 images -> augmented, normalised and mixed, on the training device.

    With a ``geometry`` (the batched path: :class:`~vitkit.data.batch_ops.BatchGeometry`) the batch
    holds images at the store's fixed size and their original ``"orig_hw"``: each is cropped, flipped
    and RandAugmented first (per sample; ``"orig_hw"`` is consumed), then ``augment`` (a
    :class:`BatchAugment`: colour jitter, normalisation, erasing), then ``mixup`` (Mixup/CutMix).
    """

    def __init__(self, augment: nn.Module, mixup=None, geometry: nn.Module | None = None):
        super().__init__()
        self.augment, self.mixup, self.geometry = augment, mixup, geometry

    def forward(self, batch: dict) -> dict:
        if self.geometry is not None:
            batch = dict(batch)
            batch["image"] = self.geometry(batch["image"], batch.pop("orig_hw"))
        batch = self.augment(batch)
        return self.mixup(batch) if self.mixup is not None else batch
