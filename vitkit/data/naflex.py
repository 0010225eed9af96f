"""Native aspect ratio (NaFlex): images as variable-length patch sequences, packed into one batch.

An image is resized, keeping its aspect ratio, to the largest size whose patch grid holds at most
``max_patches`` patches (timm NaFlex's rule, :func:`naflex_grid`), then cut into patches. A batch
pads every image's sequence to one length; ``patch_valid`` marks the real patches and
``patch_coord`` holds each patch's (row, col) in its own image's grid. The model side is
:mod:`vitkit.models.naflex`.

Patch layout follows timm's NaFlex pipeline: the ``P * P * C`` values of a patch are in
(row, col, channel) order, channel fastest, and the batch keys are timm's (``patches``,
``patch_coord``, ``patch_valid``), so batches move between the two unchanged.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DataError
from .augment import IMAGENET_MEAN, IMAGENET_STD, Normalize
from .images import to_channels
from .loader import collate
from .transforms import _interp, pil_to_uint8

Patches = tuple[torch.Tensor, torch.Tensor, tuple[int, int]]


def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    a, b = (v, v) if isinstance(v, int) else tuple(v)
    if int(a) < 1 or int(b) < 1:
        raise ValueError(f"{what} must be positive, got {v}")
    return int(a), int(b)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _largest_k(fits, limit: int) -> int:
    """The largest k in [0, limit] with ``fits(k)``, for a ``fits`` true up to some k and false after."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def naflex_grid(
    image_hw: tuple[int, int], patch_size: int | tuple[int, int], max_patches: int, max_ratio: float | None = None
) -> tuple[int, int]:
    """The patch grid (h, w) an image of ``image_hw`` pixels is resized to: timm NaFlex's rule.

    The image is scaled by the largest ratio r for which ``ceil(H r / ph) * ceil(W r / pw) <=
    max_patches`` (each side rounded up to whole patches, at least one), so the aspect ratio is
    kept up to that rounding and the budget is filled as far as it can be; small images are
    scaled up. ``max_ratio`` caps r (no upsampling beyond it). timm finds r by a bisection on
    floats; here it is found exactly: the best r is always a point where one side reaches a whole
    number of patches, r = k ph / H or k pw / W.
    """
    h, w = _pair(image_hw, "image size")
    ph, pw = _pair(patch_size, "patch_size")
    if int(max_patches) < 1:
        raise ValueError(f"max_patches must be >= 1, got {max_patches}")
    m = int(max_patches)
    # Scaling so that the height is exactly k patches: the width then needs ceil(W k ph / (H pw)).
    k_h = _largest_k(lambda k: k * _ceil_div(w * k * ph, h * pw) <= m, m)
    k_w = _largest_k(lambda k: k * _ceil_div(h * k * pw, w * ph) <= m, m)
    # Compare the two ratios k_h ph / h and k_w pw / w without floats.
    if k_h * ph * w >= k_w * pw * h:
        ratio, grid = k_h * ph / h, (k_h, max(1, _ceil_div(w * k_h * ph, h * pw)))
    else:
        ratio, grid = k_w * pw / w, (max(1, _ceil_div(h * k_w * pw, w * ph)), k_w)
    if max_ratio is not None and max_ratio < ratio:
        grid = (max(1, math.ceil(h * max_ratio / ph)), max(1, math.ceil(w * max_ratio / pw)))
    return grid


def patchify(image: torch.Tensor, patch_size: int | tuple[int, int]) -> Patches:
    """(C, H, W) image, H and W multiples of the patch -> (patches (L, ph*pw*C), coords (L, 2), grid).

    Patches are in row-major grid order; ``coords`` holds each one's (row, col); the values of a
    patch are in (row, col, channel) order. The dtype is kept (uint8 stays uint8).
    """
    ph, pw = _pair(patch_size, "patch_size")
    if image.ndim != 3:
        raise ValueError(f"patchify takes one (C, H, W) image, got shape {tuple(image.shape)}")
    C, H, W = image.shape
    if H % ph or W % pw:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {ph}x{pw}; use naflex_patchify")
    gh, gw = H // ph, W // pw
    patches = image.reshape(C, gh, ph, gw, pw).permute(1, 3, 2, 4, 0).reshape(gh * gw, ph * pw * C)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    coords = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)  # (L, 2) (row, col)
    return patches, coords, (gh, gw)


def _resize_tensor(image: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Antialiased resize of a (C, H, W) tensor; uint8 in, uint8 out (rounded, clamped)."""
    x = image.float()[None]
    x = F.interpolate(x, size=size, mode=interpolation, align_corners=False if interpolation != "nearest" else None,
                      antialias=interpolation in ("bilinear", "bicubic"))[0]
    if image.dtype == torch.uint8:
        return x.round().clamp(0, 255).to(torch.uint8)
    return x.to(image.dtype)


def naflex_patchify(
    image: torch.Tensor | Image.Image,
    patch_size: int | tuple[int, int],
    max_patches: int,
    *,
    interpolation: str = "bicubic",
    max_ratio: float | None = None,
) -> Patches:
    """Resize an image at its own aspect ratio to at most ``max_patches`` patches, then patchify.

    image: a PIL image (resized by PIL, as timm's NaFlex transforms do on PIL input; returns
        uint8 patches) or a (C, H, W) uint8 or float tensor (antialiased ``F.interpolate``).
    Returns ``(patches (L, ph*pw*C), coords (L, 2) (row, col), grid (h, w))`` with
    ``L = h * w <= max_patches`` (:func:`naflex_grid`).
    """
    ph, pw = _pair(patch_size, "patch_size")
    if isinstance(image, Image.Image):
        gh, gw = naflex_grid((image.height, image.width), (ph, pw), max_patches, max_ratio)
        size = (gw * pw, gh * ph)
        if image.size != size:
            image = image.resize(size, _interp(interpolation))
        return patchify(pil_to_uint8(image), (ph, pw))
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise ValueError(f"naflex_patchify takes a PIL image or a (C, H, W) tensor, got {type(image).__name__}"
                         + (f" of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else ""))
    gh, gw = naflex_grid(tuple(image.shape[-2:]), (ph, pw), max_patches, max_ratio)
    if tuple(image.shape[-2:]) != (gh * ph, gw * pw):
        if interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"a tensor image resizes with 'bicubic', 'bilinear' or 'nearest', not {interpolation!r}")
        image = _resize_tensor(image, (gh * ph, gw * pw), interpolation)
    return patchify(image, (ph, pw))


def pack(samples: Sequence[Patches | dict], max_patches: int | None = None) -> dict[str, torch.Tensor]:
    """Pad per-image patch sequences into one batch: ``{"patches" (B, Lmax, D), "patch_coord"
    (B, Lmax, 2) int64, "patch_valid" (B, Lmax) bool}`` (timm NaFlex's batch keys).

    samples: ``naflex_patchify`` outputs, or dicts with ``"patches"`` and ``"patch_coord"``.
    max_patches: pad every batch to this length (fixed shapes, as timm's collator does); by
        default the longest sequence of the batch. Padding is zeros at the end of each row.
    """
    if not samples:
        raise DataError("pack needs at least one sample")
    items = [(s["patches"], s["patch_coord"]) if isinstance(s, dict) else (s[0], s[1]) for s in samples]
    dims = {p.shape[-1] for p, _ in items}
    dtypes = {p.dtype for p, _ in items}
    if len(dims) > 1 or len(dtypes) > 1:
        raise DataError(
            f"samples disagree on the patch size or dtype (values per patch {sorted(dims)}, dtypes "
            f"{sorted(map(str, dtypes))}): patchify every image with one patch size and channel count"
        )
    lengths = [p.shape[0] for p, _ in items]
    L = max(lengths) if max_patches is None else int(max_patches)
    if max(lengths) > L:
        i = lengths.index(max(lengths))
        raise DataError(
            f"sample {i} has {lengths[i]} patches, more than max_patches={L}; patchify with the same "
            "max_patches the batches are packed to"
        )
    B, D = len(items), dims.pop()
    patches = torch.zeros(B, L, D, dtype=dtypes.pop())
    coords = torch.zeros(B, L, 2, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for i, (p, c) in enumerate(items):
        n = p.shape[0]
        patches[i, :n], coords[i, :n], valid[i, :n] = p, c, True
    return {"patches": patches, "patch_coord": coords, "patch_valid": valid}


def normalize_patches(
    patches: torch.Tensor, in_chans: int = 3, mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 (or [0, 1] float) patches (..., L, P*P*C) -> float ``(x - mean) / std`` per channel.

    The same statistics and arithmetic as :class:`~vitkit.data.augment.Normalize` on the image.
    """
    shape = patches.shape
    if shape[-1] % in_chans:
        raise ValueError(f"patches hold {shape[-1]} values each, not a multiple of in_chans={in_chans}")
    # Channel is the fastest axis of a patch: view the pixels as (1, C, pixels, 1) images.
    x = patches.reshape(1, -1, in_chans).transpose(1, 2)[..., None]
    return Normalize(mean, std).normalize(x)[..., 0].transpose(1, 2).reshape(shape)


class NaFlexTransform:
    """Per-sample loader transform: PIL image -> ``naflex_patchify`` output at its own aspect ratio.

    ``flip`` (training) mirrors the image left-right with probability 0.5, drawn from the
    sample's ``rng`` so a resumed run reproduces it.
    """

    def __init__(self, patch_size: int | tuple[int, int], max_patches: int, in_chans: int = 3, *,
                 interpolation: str = "bicubic", max_ratio: float | None = None, flip: bool = False):
        self.patch_size = _pair(patch_size, "patch_size")
        if int(max_patches) < 1:
            raise ValueError(f"max_patches must be >= 1, got {max_patches}")
        _interp(interpolation)
        self.max_patches, self.in_chans = int(max_patches), in_chans
        self.interpolation, self.max_ratio, self.flip = interpolation, max_ratio, flip

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> Patches:
        img = to_channels(img, self.in_chans)
        if self.flip and (rng or random).random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return naflex_patchify(img, self.patch_size, self.max_patches, interpolation=self.interpolation,
                               max_ratio=self.max_ratio)

    def __repr__(self) -> str:
        return f"NaFlexTransform(patch_size={self.patch_size}, max_patches={self.max_patches}, flip={self.flip})"


class NaFlexCollate:
    """``collate_fn`` for NaFlex batches: samples whose ``"image"`` is a ``naflex_patchify`` output
    (what :class:`NaFlexTransform` gives) -> :func:`pack` 's keys plus the loader's usual fields
    (``label``, ``index``, ``skipped``, ``bad_files``, as :func:`~vitkit.data.loader.collate`).

    Bare ``naflex_patchify`` outputs (no dict) are packed alone.
    max_patches: the length every batch is padded to (None: each batch's longest sequence).
    """

    def __init__(self, max_patches: int | None = None):
        if max_patches is not None and int(max_patches) < 1:
            raise ValueError(f"max_patches must be >= 1 or None, got {max_patches}")
        self.max_patches = None if max_patches is None else int(max_patches)

    def __call__(self, samples: Sequence) -> dict:
        if not samples or not isinstance(samples[0], dict):
            return pack(samples, self.max_patches)
        packed = pack([s["image"] for s in samples], self.max_patches)
        # The other fields collate as for any image batch; an empty image stands in for the patches.
        empty = torch.zeros(0, 0, dtype=torch.uint8)
        rest = collate([{**s, "image": empty} for s in samples])
        rest.pop("image", None)
        rest.pop("size", None)
        return {**rest, **packed}


__all__ = [
    "NaFlexCollate", "NaFlexTransform", "naflex_grid", "naflex_patchify", "normalize_patches", "pack", "patchify",
]
