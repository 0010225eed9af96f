"""Decoding image bytes into PIL images of the channel count a model expects.

Every dataset format goes through :func:`decode_image`, so the rules for odd files live in
one place:

- 1 channel → mode ``"L"``, 3 channels → mode ``"RGB"``.
- Transparency (``RGBA``, ``LA``, ``PA`` and palette images with a transparency key) is
  composited on **white**: icons and scans are drawn for a white page, and a black backdrop
  would turn every transparent margin into a strong dark frame the model has to learn around.
- 16-bit and 32-bit integer images (``I;16``, ``I``) are scaled from 0..65535 to 0..255
  (``v * 255 / 65535``), not clipped, so a 16-bit white (65535) becomes 255.
- Float images (``F``) in 0..1 are scaled by 255; anything else is clipped to 0..255.
- Decompression bombs (more than :data:`MAX_IMAGE_PIXELS` pixels) are refused like a
  corrupt file, so one hostile file cannot exhaust memory in a worker.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError

# 8192 x 8192: above anything a ViT pipeline resizes from in practice, and about 200 MB as
# RGB, which a DataLoader worker can survive.
MAX_IMAGE_PIXELS = 8192 * 8192
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


class BadImageError(Exception):
    """A file that cannot be used as an image: corrupt, truncated, empty, not an image, or a bomb."""


def decode_image(data: bytes | str, in_chans: int = 3, name: str = "<bytes>") -> Image.Image:
    """Decode ``data`` (file bytes or a path) fully into a PIL image with ``in_chans`` channels.

    Raises:
        BadImageError: the file is empty, not an image, truncated or too large.
    """
    try:
        with warnings.catch_warnings():
            # The warning zone (1x..2x the limit) is refused too: the limit is the policy.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(data, bytes | bytearray):
                if len(data) == 0:
                    raise BadImageError(f"{name}: empty file (0 bytes)")
                img = Image.open(io.BytesIO(data))
            else:
                img = Image.open(data)
            img.load()  # decode now: a truncated file must fail here, not later in a transform
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"{name}: refused as a decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise BadImageError(f"{name}: not an image in any format Pillow can read") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadImageError(f"{name}: {type(e).__name__}: {e}") from None
    return to_channels(img, in_chans)


def to_channels(img: Image.Image, in_chans: int) -> Image.Image:
    """Convert any PIL mode to ``"L"`` (in_chans=1) or ``"RGB"`` (in_chans=3), see the module notes."""
    if in_chans not in (1, 3):
        raise ConfigError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
    target = "L" if in_chans == 1 else "RGB"
    if img.mode == target:
        return img
    img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert(target)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale high bit-depth modes to 8-bit ``"L"``; other modes pass through."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        # A 32-bit "I" image from a 16-bit PNG holds 0..65535; an "I" image that never exceeds
        # 255 is already 8-bit data stored wide.
        scale = 255.0 / 65535.0 if (img.mode != "I" or arr.max(initial=0) > 255) else 1.0
        return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0 and np.nanmin(arr) >= 0.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8), "L")
    return img


def read_image(image: str | os.PathLike | Image.Image, in_chans: int) -> Image.Image:
    """A file path or PIL image -> a PIL image with ``in_chans`` channels; DataError if it cannot be read."""
    if isinstance(image, Image.Image):
        return image
    try:
        return decode_image(str(image), in_chans, name=str(image))
    except BadImageError as e:
        raise DataError(f"cannot read image {e}") from None
