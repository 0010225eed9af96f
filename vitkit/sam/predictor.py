"""Prompting a SAM model many times on one image: the image embedding is computed once.

>>> from vitkit.sam import create_sam
>>> from vitkit.sam.predictor import SamPredictor
>>> predictor = SamPredictor(create_sam("sam_test"))
>>> predictor.set_image("street.jpg")              # the image encoder runs here, once
>>> masks, iou, low_res = predictor.predict(points=[[120, 80]], labels=[1])
>>> masks, iou, _ = predictor.predict(box=[40, 30, 200, 160], multimask=False)   # decoder only

Points and boxes are in the original image's pixels (x, y); masks come back at the original
size. As in segment-anything's ``SamPredictor``, ``low_res`` logits of one prediction can be fed
back as ``mask_input`` of the next.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.images import read_image
from ..errors import ConfigError, PathNotFoundError


def image_array(image) -> np.ndarray:
    """A path, PIL image or uint8 array (H, W, 3) -> uint8 RGB (H, W, 3).

    Raises:
        PathNotFoundError: a path that does not exist.
        DataError: a file that is not a readable image.
        ConfigError: an array that is not (H, W, 3) uint8.
    """
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).expanduser().is_file():
            raise PathNotFoundError(f"no such image file: {image}")
        image = read_image(Path(image).expanduser(), 3)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ConfigError(
            f"an image must be uint8 (H, W, 3) RGB, a PIL image or a path, got {arr.dtype} {tuple(arr.shape)}"
        )
    return arr


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class SamPredictor:
    """One image, many prompts: :meth:`set_image` runs the image encoder, :meth:`predict` only the
    prompt encoder and the mask decoder.

    ``model``: a :class:`vitkit.sam.Sam` (put it on the device first; it is used in eval mode).
    """

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return _device(self.model)

    def reset_image(self) -> None:
        """Forget the image and its embedding."""
        self.embedding: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    @property
    def is_image_set(self) -> bool:
        return self.embedding is not None

    @torch.no_grad()
    def set_image(self, image) -> None:
        """Encode ``image`` (uint8 RGB array (H, W, 3), PIL image or path): the one image-encoder pass."""
        arr = image_array(image)
        if min(arr.shape[:2]) < 1:
            raise ConfigError(f"the image is empty: {arr.shape[1]}x{arr.shape[0]} pixels")
        x, input_size, original_size = self.model.preprocess(arr)
        self.reset_image()
        self.embedding = self.model.encode_image(x.to(self.device))
        self.input_size = tuple(int(v) for v in input_size)
        self.original_size = tuple(int(v) for v in original_size)

    def _check_set(self) -> None:
        if not self.is_image_set:
            raise ConfigError("no image yet: call set_image(image) before predict")

    def _points(self, points, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 2) original pixels and (N,) labels -> input-frame (1, N, 2) float and (1, N) int tensors."""
        H, W = self.original_size
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim == 1 and pts.size == 2:
            pts = pts[None]
        if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
            raise ConfigError(f"points must be (N, 2) pixel coordinates (x, y), got shape {pts.shape}")
        if not np.isfinite(pts).all():
            raise ConfigError(f"points must be finite numbers, got {pts.tolist()}")
        outside = [p for p in pts.tolist() if not (0 <= p[0] <= W and 0 <= p[1] <= H)]
        if outside:
            raise ConfigError(
                f"point {outside[0]} (x, y) lies outside the {W}x{H} image: x must be in [0, {W}], y in [0, {H}]"
            )
        lab = np.ones(len(pts), dtype=np.int64) if labels is None else np.asarray(labels).reshape(-1)
        if len(lab) != len(pts):
            raise ConfigError(f"{len(pts)} points but {len(lab)} labels: give one label (1 or 0) per point")
        if not np.isin(lab, (0, 1)).all():
            raise ConfigError(f"point labels are 1 (foreground) or 0 (background), got {lab.tolist()}")
        coords = self.model.transform_coords(torch.as_tensor(pts, dtype=torch.float64)[None], self.original_size)
        return (coords.to(self.device, torch.float32),
                torch.as_tensor(lab, dtype=torch.int64, device=self.device)[None])

    def _box(self, box) -> torch.Tensor:
        H, W = self.original_size
        b = np.asarray(box, dtype=np.float64).reshape(-1)
        if b.shape != (4,) or not np.isfinite(b).all():
            raise ConfigError(f"a box is 4 numbers x0, y0, x1, y1 in pixels, got {np.asarray(box).tolist()}")
        x0, y0, x1, y1 = b.tolist()
        if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
            raise ConfigError(
                f"box {b.tolist()} is not a box inside the {W}x{H} image: need 0 <= x0 < x1 <= {W} and "
                f"0 <= y0 < y1 <= {H}"
            )
        corners = self.model.transform_coords(torch.as_tensor(b, dtype=torch.float64).reshape(1, 2, 2),
                                              self.original_size)
        return corners.reshape(1, 4).to(self.device, torch.float32)

    def _mask_input(self, mask_input) -> torch.Tensor:
        m = torch.as_tensor(np.asarray(mask_input), dtype=torch.float32)
        side = tuple(4 * s for s in self.embedding.shape[-2:])
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or m.shape[0] != 1 or tuple(m.shape[-2:]) != side:
            raise ConfigError(
                f"mask_input is one low-res logit mask (1, {side[0]}, {side[1]}) as predict returns it "
                f"(low_res[k][None]), got {tuple(m.shape)}"
            )
        return m[None].to(self.device)

    @torch.no_grad()
    def predict(self, points=None, labels=None, box=None, mask_input=None, multimask: bool = True
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt on the image set by :meth:`set_image`.

        Args:
            points: (N, 2) pixel coordinates (x, y) in the original image.
            labels: (N,) 1 = foreground, 0 = background (default: all foreground).
            box: (4,) x0, y0, x1, y1 in the original image's pixels.
            mask_input: (1, 4h, 4w) low-res logits, e.g. ``low_res[k][None]`` of an earlier prediction.
            multimask: three masks (whole, part, subpart) for an ambiguous prompt; else one.

        Returns:
            masks bool (M, H, W) at the original size, predicted IoU (M,), low-res logits (M, 4h, 4w);
            M = 3 with ``multimask``, else 1.
        """
        self._check_set()
        if points is None and box is None and mask_input is None:
            raise ConfigError("give a prompt: points (with labels), a box, or a mask_input")
        if labels is not None and points is None:
            raise ConfigError("labels were given without points")
        pts = self._points(points, labels) if points is not None else None
        boxes = self._box(box) if box is not None else None
        mask = self._mask_input(mask_input) if mask_input is not None else None
        logits, iou, low = self.predict_torch(pts, boxes, mask, multimask=multimask)
        masks = logits > self.model.mask_threshold
        return masks[0].cpu().numpy(), iou[0].float().cpu().numpy(), low[0].float().cpu().numpy()

    @torch.no_grad()
    def predict_torch(self, points: tuple[torch.Tensor, torch.Tensor] | None = None, boxes: torch.Tensor | None = None,
                      mask_input: torch.Tensor | None = None, multimask: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prompts already in the model's input frame (see ``Sam.transform_coords``).

        ``points``: (coords (P, N, 2), labels (P, N)); ``boxes``: (P, 4); ``mask_input``: (P, 1, 4h, 4w).
        Returns (mask logits at the original size (P, M, H, W), IoU (P, M), low-res logits (P, M, 4h, 4w)).
        """
        self._check_set()
        low, iou = self.model.decode(self.embedding, points=points, boxes=boxes, mask_input=mask_input,
                                     multimask=multimask)
        logits = self.model.postprocess_masks(low, self.input_size, self.original_size)
        return logits, iou, low


__all__ = ["SamPredictor", "image_array"]
