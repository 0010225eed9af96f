"""Transforms that move an image and its mask or depth map together.

Training (:class:`JointTrainTransform`, as mmsegmentation's pipeline): random rescale by a
factor in ``scale`` of the image's own size, random crop to ``crop_size`` (where the rescaled
image is smaller, the crop is padded bottom/right: image 0, mask ``ignore_index``, depth 0),
horizontal flip, and photometric jitter on the image only. Masks and depth are resized with
NEAREST: class ids are never interpolated, and a depth between two surfaces is no surface.
Evaluation (:class:`JointEvalTransform`) keeps the full resolution; the model pads to its stride.

Every random draw comes from the ``random.Random`` the loader passes per sample
(:func:`~vitkit.data.loader.sample_rng`), so batches are reproducible and resumable.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageEnhance

from .images import to_channels
from .transforms import _interp, _size2, pil_to_uint8

_NEAREST = Image.Resampling.NEAREST


def _target_image(target: dict) -> tuple[str, Image.Image]:
    if "mask" in target:
        m = target["mask"]
        return "mask", m if isinstance(m, Image.Image) else Image.fromarray(np.asarray(m, dtype=np.uint8), "L")
    if "depth" in target:
        return "depth", Image.fromarray(np.asarray(target["depth"], dtype=np.float32), "F")
    raise ValueError(f"a dense target holds 'mask' or 'depth', got keys {sorted(target)}")


def _output(img: Image.Image, kind: str, tgt: Image.Image, size: tuple[int, int], ignore_index: int) -> dict:
    """uint8 image (C, h, w) and the target tensor, padded bottom/right to ``size`` (h, w) when given."""
    image = pil_to_uint8(img)
    if kind == "mask":
        out = {"mask": torch.from_numpy(np.asarray(tgt, dtype=np.int64).copy()), "ignore_index": ignore_index}
        pad_value = ignore_index
    else:
        out = {"depth": torch.from_numpy(np.asarray(tgt, dtype=np.float32).copy())}
        pad_value = 0
    h, w = image.shape[-2:]
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph or pw:
        image = torch.nn.functional.pad(image, (0, pw, 0, ph), value=0)
        out[kind] = torch.nn.functional.pad(out[kind][None], (0, pw, 0, ph), value=pad_value)[0]
    return {"image": image, **out}


class JointTrainTransform:
    """Random scale, crop, flip and photometric jitter of an image with its mask or depth map.

    Args:
        crop_size: output side, or (h, w).
        in_chans: 1 or 3; the image is converted first.
        scale: range of the rescale factor (of the image's own size), drawn uniformly.
        hflip: probability of a horizontal flip.
        ignore_index: the mask value of padding.
        color_jitter: strength s of brightness, contrast and saturation jitter (factors drawn in
            [1 - s, 1 + s], in a random order); 0 for none.
        interpolation: resampling of the image ("bilinear" as mmsegmentation); masks and depth
            always use nearest.

    ``__call__(img, target, rng)`` returns ``{"image": uint8 (C, h, w)}`` plus ``"mask"`` int64
    (h, w) and ``"ignore_index"``, or ``"depth"`` float32 (h, w).
    """

    def __init__(self, crop_size, in_chans: int = 3, scale: tuple[float, float] = (0.5, 2.0), hflip: float = 0.5,
                 ignore_index: int = 255, color_jitter: float = 0.0, interpolation: str = "bilinear"):
        self.crop_size = _size2(crop_size)
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be 0 < lo <= hi, got {scale}")
        self.in_chans, self.scale, self.hflip = in_chans, tuple(scale), hflip
        self.ignore_index, self.color_jitter = ignore_index, color_jitter
        self.interpolation = interpolation
        self._resample = _interp(interpolation)

    def _jitter(self, img: Image.Image, rng: random.Random) -> Image.Image:
        ops = [ImageEnhance.Brightness, ImageEnhance.Contrast] + ([ImageEnhance.Color] if img.mode == "RGB" else [])
        rng.shuffle(ops)
        s = self.color_jitter
        for op in ops:
            img = op(img).enhance(rng.uniform(max(0.0, 1 - s), 1 + s))
        return img

    def __call__(self, img: Image.Image, target: dict, rng: random.Random | None = None) -> dict:
        rng = rng or random.Random()
        img = to_channels(img, self.in_chans)
        kind, tgt = _target_image(target)
        if tgt.size != img.size:
            raise ValueError(f"{kind} size {tgt.size} differs from the image size {img.size}")
        f = rng.uniform(*self.scale)
        size = (max(1, round(img.width * f)), max(1, round(img.height * f)))
        img, tgt = img.resize(size, self._resample), tgt.resize(size, _NEAREST)
        ch, cw = self.crop_size
        top = rng.randint(0, max(size[1] - ch, 0))
        left = rng.randint(0, max(size[0] - cw, 0))
        box = (left, top, min(left + cw, size[0]), min(top + ch, size[1]))
        img, tgt = img.crop(box), tgt.crop(box)
        if rng.random() < self.hflip:
            img, tgt = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), tgt.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.color_jitter > 0:
            img = self._jitter(img, rng)
        return _output(img, kind, tgt, self.crop_size, self.ignore_index)

    def __repr__(self) -> str:
        return (f"JointTrainTransform(crop_size={self.crop_size}, scale={self.scale}, hflip={self.hflip}, "
                f"color_jitter={self.color_jitter}, in_chans={self.in_chans})")


class JointEvalTransform:
    """The image at full resolution (converted to ``in_chans``) with its target, unchanged."""

    def __init__(self, in_chans: int = 3, ignore_index: int = 255):
        self.in_chans, self.ignore_index = in_chans, ignore_index

    def __call__(self, img: Image.Image, target: dict, rng: random.Random | None = None) -> dict:
        img = to_channels(img, self.in_chans)
        kind, tgt = _target_image(target)
        if tgt.size != img.size:
            raise ValueError(f"{kind} size {tgt.size} differs from the image size {img.size}")
        return _output(img, kind, tgt, (0, 0), self.ignore_index)

    def __repr__(self) -> str:
        return f"JointEvalTransform(in_chans={self.in_chans})"
