"""Per-sample CPU transforms: PIL image → fixed-size uint8 tensor (C, H, W).

They run in DataLoader workers and do what must be done per image (crop, resize, flip, and
RandAugment on the PIL image, :mod:`vitkit.data.rand_augment`); uint8 output is 4x cheaper to
collate and transfer than float. Normalisation, colour jitter and random erasing run batched on
the device (:mod:`vitkit.data.augment`). On the batched path (``data.augment_on=device``) the
workers only bring each image to a fixed size (:class:`SourceTransform`), or a decode-once store
does (:mod:`vitkit.data.store`), and the crops, flips and RandAugment run batched as well.

Randomness comes from an explicit ``random.Random`` passed per sample, which the loader
derives from ``(seed, epoch, index)``: the same sample in the same epoch gets the same crop
no matter which worker draws it, so a resumed run reproduces its batches exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .augment import IMAGENET_MEAN
from .images import to_channels
from .rand_augment import RandAugment

_INTERP = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def _size2(img_size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"img_size must be positive, got {img_size}")
    return int(h), int(w)


def _interp(name: str):
    if name not in _INTERP:
        raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {name!r}")
    return _INTERP[name]


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL "L"/"RGB" → uint8 tensor (C, H, W)."""
    arr = np.array(img, dtype=np.uint8)  # a writable copy: PIL's buffer view is read-only
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


class TrainTransform:
    """Random-resized crop + horizontal flip (+ RandAugment) → uint8 (C, H, W), as timm's train transform.

    With the normalisation and random erasing that follow on the device
    (:class:`~vitkit.data.augment.BatchAugment`), DeiT's settings give the pixels of timm's
    ``create_transform(..., is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
    interpolation="bicubic")`` for the same drawn crop, flip and ops.

    Args:
        img_size: output side, or (H, W).
        in_chans: 1 or 3; images of another mode are converted first.
        scale: range of the crop's area as a fraction of the image.
        ratio: range of the crop's aspect ratio (w / h), sampled log-uniformly.
        hflip: probability of a horizontal flip.
        interpolation: resampling of the crop and of RandAugment's geometric ops (which use
            bicubic when this is "lanczos").
        auto_augment: a RandAugment spec such as ``"rand-m9-mstd0.5-inc1"``; None or "" for none.
        mean: the normalisation mean (0..1 per channel); RandAugment fills the pixels its
            geometric ops uncover with it, so they normalise to about zero.
        translate_pct: RandAugment's largest translation, as a fraction of the image side.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int],
        in_chans: int = 3,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        interpolation: str = "bicubic",
        auto_augment: str | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        translate_pct: float = 0.45,
    ):
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.size = _size2(img_size)
        self.in_chans = in_chans
        self.scale, self.ratio, self.hflip = scale, ratio, hflip
        self.interpolation = _interp(interpolation)
        fill = [min(255, round(255 * v)) for v in mean]
        # PIL's affine transforms resample with nearest, bilinear or bicubic only.
        affine = self.interpolation if interpolation in ("nearest", "bilinear", "bicubic") else _INTERP["bicubic"]
        self.rand_augment = (
            RandAugment(auto_augment, fill=fill * 3 if len(fill) == 1 else fill, translate_pct=translate_pct,
                        resample=affine)
            if auto_augment else None
        )

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of a random crop; falls back to the largest centred crop within ``ratio``.

        The draws are timm's and torchvision's ``RandomResizedCrop.get_params`` in the same order
        (the top before the left), so a generator in the same state gives the same box. Unlike
        theirs, a box that rounds to zero pixels (images of a few pixels) is redrawn, not cropped.
        """
        area = width * height
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_r))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                y0 = rng.randint(0, height - h)
                x0 = rng.randint(0, width - w)
                return x0, y0, x0 + w, y0 + h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        x0, y0 = (width - w) // 2, (height - h) // 2
        return x0, y0, x0 + w, y0 + h

    def crop_resize(self, img: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
        """Crop ``box`` out of the image, then resize the crop to the output size.

        As timm's ``RandomResizedCropAndInterpolation`` (torchvision's ``resized_crop``): the
        filter sees only the crop, its edge pixels repeated beyond it. A resize with PIL's
        ``box=`` instead reads the image's pixels around the box into the crop's border pixels
        (at 32 px, a tenth of the output pixels, by tens of levels on a textured image).
        """
        return img.crop(box).resize((self.size[1], self.size[0]), self.interpolation)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng if rng is not None else random.Random()
        img = to_channels(img, self.in_chans)
        out = self.crop_resize(img, self.crop_box(img.width, img.height, rng))
        if rng.random() < self.hflip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            out = self.rand_augment(out, rng)
        return pil_to_uint8(out)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(size={self.size}, in_chans={self.in_chans}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip={self.hflip}, rand_augment={self.rand_augment})"
        )


class SourceTransform:
    """The batched path's per-image step: the image at one fixed size, and the size it had.

    ``(img, rng) -> {"image": uint8 (C, S_h, S_w), "orig_hw": int64 (2,)}``: converted to
    ``in_chans`` and resized to ``size`` (untouched when it has that size already). Crops, flips and
    RandAugment come later, per batch on the device (:class:`~vitkit.data.batch_ops.BatchGeometry`),
    drawn in the image's own coordinates (``orig_hw``). The decode-once store
    (:mod:`vitkit.data.store`) holds exactly this output; without a store the workers produce it.
    """

    def __init__(self, size: int | tuple[int, int], in_chans: int = 3, interpolation: str = "bicubic"):
        self.size = _size2(size)
        self.in_chans = in_chans
        self.interpolation = _interp(interpolation)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> dict:
        img = to_channels(img, self.in_chans)
        orig_hw = torch.tensor([img.height, img.width], dtype=torch.long)
        if (img.height, img.width) != self.size:
            img = img.resize((self.size[1], self.size[0]), self.interpolation)
        return {"image": pil_to_uint8(img), "orig_hw": orig_hw}

    def __repr__(self) -> str:
        return f"SourceTransform(size={self.size}, in_chans={self.in_chans})"


class EvalTransform:
    """Resize the shorter side to ``img_size / crop_pct``, then centre-crop ``img_size`` → uint8 (C, H, W)."""

    def __init__(
        self,
        img_size: int | tuple[int, int],
        in_chans: int = 3,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
    ):
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.size = _size2(img_size)
        self.in_chans = in_chans
        self.crop_pct = crop_pct
        self.interpolation = _interp(interpolation)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        img = to_channels(img, self.in_chans)
        th, tw = self.size
        short = math.floor(max(th, tw) / self.crop_pct)
        scale = short / min(img.width, img.height)
        rw, rh = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
        x0, y0 = (rw - tw) / 2, (rh - th) / 2
        # One resample with a source box equals resize-then-crop, without the intermediate image.
        box = (x0 / rw * img.width, y0 / rh * img.height, (x0 + tw) / rw * img.width, (y0 + th) / rh * img.height)
        return pil_to_uint8(img.resize((tw, th), self.interpolation, box=box))

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, in_chans={self.in_chans}, crop_pct={self.crop_pct})"
