"""Transforms that move an image and its boxes together, for object detection.

Training (:class:`BoxTrainTransform`, after DETR's pipeline): with probability ``crop_p`` a
random crop of the image (each side a fraction in ``scale`` of the image's), boxes clipped to
it and, where the crop cut them, dropped when narrower or lower than ``min_box_px`` output
pixels (boxes left empty are always dropped); then a resize keeping the aspect ratio so the
long side is ``size`` (or one of ``sizes``, drawn per image, for DETR-style multi-scale
training); a horizontal flip; photometric jitter on the image only.
Evaluation (:class:`BoxEvalTransform`): the resize alone.

Boxes are xyxy in pixel edges (a box covering pixel columns 0..9 is x 0..10), so a resize scales
them exactly by the size ratio on each axis. Every random draw comes from the ``random.Random``
the loader passes per sample (:func:`~vitkit.data.loader.sample_rng`).

``__call__(img, target, rng)`` returns ``{"image": uint8 (C, h, w), "boxes": float32 (K, 4),
"labels": int64 (K,), "orig_size": int64 (H, W) before the transform, "image_id": int}``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .images import to_channels
from .joint import JointTrainTransform
from .transforms import _interp, pil_to_uint8


def _fit(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(w, h) with the long side ``long_side`` and the aspect ratio of ``width`` x ``height``."""
    f = long_side / max(width, height)
    return max(1, round(width * f)), max(1, round(height * f))


def _arrays(target: dict) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.asarray(target.get("boxes", np.zeros((0, 4))), np.float32).reshape(-1, 4)
    labels = np.asarray(target.get("labels", np.zeros(0)), np.int64).reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels in the target")
    return boxes.copy(), labels.copy()


def _resize(img: Image.Image, boxes: np.ndarray, long_side: int, resample) -> Image.Image:
    """Resize so the long side is ``long_side``; ``boxes`` are scaled in place."""
    size = _fit(img.width, img.height, long_side)
    if size != img.size:
        boxes[:, 0::2] *= size[0] / img.width
        boxes[:, 1::2] *= size[1] / img.height
        img = img.resize(size, resample)
    return img


def _output(img: Image.Image, boxes: np.ndarray, labels: np.ndarray, orig: tuple[int, int], target: dict) -> dict:
    return {"image": pil_to_uint8(img), "boxes": torch.from_numpy(boxes.astype(np.float32)),
            "labels": torch.from_numpy(labels.astype(np.int64)), "orig_size": torch.tensor(orig, dtype=torch.long),
            "image_id": int(target.get("image_id", -1))}


class BoxTrainTransform:
    """Random crop, aspect-keeping resize, flip and photometric jitter of an image with its boxes.

    Args:
        size: the long side of the output (pixels).
        scale: range of the crop's side as a fraction of the image's side, drawn per axis.
        crop: whether to crop at all; ``crop_p`` is the probability of a crop (DETR: 0.5).
        hflip: probability of a horizontal flip.
        color_jitter: strength s of brightness, contrast and saturation jitter (factors in
            [1 - s, 1 + s], as :class:`~vitkit.data.joint.JointTrainTransform`); 0 for none.
        in_chans: 1 or 3; the image is converted first.
        min_box_px: boxes the crop cut that end narrower or lower than this (in output pixels) are dropped.
        sizes: long sides to draw from per image (multi-scale); None for ``size`` only. DETR draws
            the short side and caps the long one; drawing the long side keeps every image within
            a ``max(sizes)`` square.
        interpolation: resampling of the image.
    """

    def __init__(self, size: int, *, scale: tuple[float, float] = (0.5, 1.0), crop: bool = True, crop_p: float = 0.5,
                 hflip: float = 0.5, color_jitter: float = 0.0, in_chans: int = 3, min_box_px: float = 2.0,
                 sizes: Sequence[int] | None = None, interpolation: str = "bilinear"):
        if size < 1 or any(s < 1 for s in sizes or ()):
            raise ValueError(f"sizes must be positive, got size={size}, sizes={sizes}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must be 0 < lo <= hi <= 1 (a fraction of the image side), got {scale}")
        self.size, self.sizes = int(size), tuple(int(s) for s in sizes) if sizes else None
        self.scale, self.crop, self.crop_p, self.hflip = tuple(scale), crop, crop_p, hflip
        self.color_jitter, self.in_chans, self.min_box_px = color_jitter, in_chans, min_box_px
        self.interpolation = interpolation
        self._resample = _interp(interpolation)
        self._photometric = JointTrainTransform(1, in_chans=in_chans, color_jitter=color_jitter)

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """A random crop (left, top, right, bottom) of a ``width`` x ``height`` image."""
        w = max(1, round(width * rng.uniform(*self.scale)))
        h = max(1, round(height * rng.uniform(*self.scale)))
        left, top = rng.randint(0, width - w), rng.randint(0, height - h)
        return left, top, left + w, top + h

    def __call__(self, img: Image.Image, target: dict, rng: random.Random | None = None) -> dict:
        rng = rng or random.Random()
        img = to_channels(img, self.in_chans)
        orig = (img.height, img.width)
        boxes, labels = _arrays(target)
        long_side = rng.choice(self.sizes) if self.sizes else self.size
        cut = np.zeros(len(boxes), bool)
        if self.crop and rng.random() < self.crop_p:
            left, top, right, bottom = self.crop_box(img.width, img.height, rng)
            img = img.crop((left, top, right, bottom))
            before = boxes - np.array([left, top, left, top], np.float32)
            boxes = before.copy()
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, right - left)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, bottom - top)
            cut = (boxes != before).any(1)
        img = _resize(img, boxes, long_side, self._resample)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        # Only boxes the crop cut are judged by min_box_px: a small object left whole is still an object.
        keep = (w > 0) & (h > 0) & ~(cut & ((w < self.min_box_px) | (h < self.min_box_px)))
        boxes, labels = boxes[keep], labels[keep]
        if rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes[:, [0, 2]] = img.width - boxes[:, [2, 0]]
        if self.color_jitter > 0:
            img = self._photometric._jitter(img, rng)
        return _output(img, boxes, labels, orig, target)

    def __repr__(self) -> str:
        return (f"BoxTrainTransform(size={self.size}, sizes={self.sizes}, scale={self.scale}, crop_p="
                f"{self.crop_p if self.crop else 0}, hflip={self.hflip}, color_jitter={self.color_jitter}, "
                f"min_box_px={self.min_box_px}, in_chans={self.in_chans})")


class BoxEvalTransform:
    """The image resized keeping its aspect ratio so the long side is ``size``, boxes scaled with it."""

    def __init__(self, size: int, in_chans: int = 3, interpolation: str = "bilinear"):
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.size, self.in_chans = int(size), in_chans
        self._resample = _interp(interpolation)

    def __call__(self, img: Image.Image, target: dict, rng: random.Random | None = None) -> dict:
        img = to_channels(img, self.in_chans)
        orig = (img.height, img.width)
        boxes, labels = _arrays(target)
        img = _resize(img, boxes, self.size, self._resample)
        return _output(img, boxes, labels, orig, target)

    def __repr__(self) -> str:
        return f"BoxEvalTransform(size={self.size}, in_chans={self.in_chans})"
