"""RandAugment's PIL operations on uint8 batches, computed the way Pillow computes them.

Every function takes uint8 (B, C, H, W) images (C = 1 for "L", 3 for "RGB") with one argument
per image (a (B,) tensor) and returns, image by image, what the PIL call in
:mod:`vitkit.data.rand_augment` returns (Pillow 12): the lookup-table ops from the same
histograms and integer rules (a table value above 255 clipped as ``Image.point`` clips it),
``Image.blend``'s float32 arithmetic and truncation, the SMOOTH kernel's float32 sums with its
one-pixel border copied: bit for bit on x86-64, where Pillow's C code does not fuse
multiply-adds, since the float operations are done one at a time in its order. Geometric ops
resample as ``Image.transform`` does (pixel-centre source points in float64, Pillow's own
bicubic (Keys a = -1) and bilinear formulas, edge pixels repeated, uncovered pixels filled,
nearest in Pillow's fixed point): bit for bit, except that bicubic interpolates in float32
for speed, which puts a pixel one level off where the exact value is within about 1e-4 of a
whole number (up to 1% of the pixels for shifts by simple fractions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .rand_augment import GEOMETRIC

ENHANCE = ("Color", "Contrast", "Brightness", "Sharpness")
POINT = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd")

# ImageFilter.SMOOTH's kernel as Pillow holds it: float32 weights divided by the float32 scale 13.
_SMOOTH_SIDE = float(np.float32(1) / np.float32(13))
_SMOOTH_MID = float(np.float32(5) / np.float32(13))


def _per_image(arg: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    return arg.to(dtype).view(-1, 1, 1, 1)


def histogram(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> int64 (B, C, 256): ``Image.histogram()`` of each image, per band."""
    b, c = x.shape[:2]
    offsets = 256 * torch.arange(b * c, device=x.device).view(b * c, 1)
    flat = x.reshape(b * c, -1).long() + offsets
    return torch.bincount(flat.flatten(), minlength=256 * b * c).view(b, c, 256)


def apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """``Image.point(lut)``: ``lut`` (B, C or 1, 256) integers, clipped to 0..255 as Pillow does."""
    b, c, h, w = x.shape
    table = lut.clamp(0, 255).to(torch.uint8).expand(b, c, 256)
    return table.gather(2, x.reshape(b, c, h * w).long()).view(b, c, h, w)


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """``convert("L")`` of RGB images: ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16`` -> (B, 1, H, W)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(1)


def blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, image, factor)`` per image: float32 ``d + f * (i - d)``, clipped, truncated."""
    f = _per_image(factor, torch.float32)  # Pillow hands alpha to C as a float
    d = degenerate.float()
    v = d + f * (image.float() - d)
    return v.clamp_(0, 255).trunc_().to(torch.uint8)


def smooth(x: torch.Tensor) -> torch.Tensor:
    """``filter(ImageFilter.SMOOTH)``: 3x3 float32 sums in Pillow's order, + 0.5, truncated; border copied."""
    if x.shape[-2] < 3 or x.shape[-1] < 3:
        return x.clone()  # Pillow leaves images smaller than the kernel as they are
    f = x.float()

    def row(r: torch.Tensor, mid: float) -> torch.Tensor:
        return (r[..., :-2] * _SMOOTH_SIDE + r[..., 1:-1] * mid) + r[..., 2:] * _SMOOTH_SIDE

    ss = 0.5 + row(f[..., 2:, :], _SMOOTH_SIDE)  # Pillow starts from the row below
    ss = ss + row(f[..., 1:-1, :], _SMOOTH_MID)
    ss = ss + row(f[..., :-2, :], _SMOOTH_SIDE)
    out = x.clone()
    out[..., 1:-1, 1:-1] = ss.clamp_(0, 255).trunc_().to(torch.uint8)
    return out


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    present = histogram(x) > 0
    lo = present.to(torch.uint8).argmax(-1, keepdim=True)  # the first level present, per band
    hi = 255 - present.flip(-1).to(torch.uint8).argmax(-1, keepdim=True)
    scale = 255.0 / (hi - lo).clamp(min=1).double()
    offset = -lo.double() * scale
    levels = torch.arange(256, device=x.device, dtype=torch.float64)
    lut = torch.trunc(levels * scale + offset)
    return apply_lut(x, torch.where(hi > lo, lut, levels).long())


def _equalize(x: torch.Tensor) -> torch.Tensor:
    hist = histogram(x)
    hi = 255 - (hist > 0).flip(-1).to(torch.uint8).argmax(-1, keepdim=True)
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, hi)) // 255
    n = step // 2 + hist.cumsum(-1) - hist  # step // 2 plus the count below each level
    lut = torch.where(step > 0, n // step.clamp(min=1), torch.arange(256, device=x.device))
    return apply_lut(x, lut)


def point_op(name: str, x: torch.Tensor, arg: torch.Tensor | None) -> torch.Tensor:
    """The lookup-table ops: AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd."""
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Invert":
        return 255 - x
    if name == "Posterize":
        keep = 256 - 2 ** (8 - _per_image(arg))  # 0xFF & ~(2 ** (8 - bits) - 1)
        return x & keep.to(torch.uint8)
    if name == "Solarize":
        return torch.where(x < _per_image(arg), x, 255 - x)
    if name == "SolarizeAdd":
        added = (x.to(torch.int16) + _per_image(arg, torch.int16)).clamp(max=255).to(torch.uint8)
        return torch.where(x < 128, added, x)
    raise ValueError(f"{name!r} is not a lookup-table op; expected one of {POINT}")


def enhance(name: str, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.<name>(img).enhance(factor)`` for Color, Contrast, Brightness, Sharpness."""
    if name == "Brightness":
        return blend(torch.zeros_like(x[:, :1, :1, :1]), x, factor)
    if name == "Color":
        # A gray image is its own degenerate: Pillow returns a copy.
        return x.clone() if x.shape[1] == 1 else blend(to_gray(x), x, factor)
    if name == "Contrast":
        gray = to_gray(x)
        mean = gray.flatten(1).sum(1).double() / gray[0].numel()
        return blend(torch.trunc(mean + 0.5).to(torch.uint8).view(-1, 1, 1, 1), x, factor)
    if name == "Sharpness":
        return blend(smooth(x), x, factor)
    raise ValueError(f"{name!r} is not an enhance op; expected one of {ENHANCE}")


def rotation_matrix(degrees: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 6) float64: the inverse affine matrix of ``Image.rotate(degrees)`` about the centre."""
    angle = -(torch.remainder(degrees.double(), 360.0) * (math.pi / 180.0))
    cos = torch.round(torch.cos(angle), decimals=15)
    sin = torch.round(torch.sin(angle), decimals=15)
    neg_sin = torch.round(-torch.sin(angle), decimals=15)
    cx, cy = width / 2, height / 2
    tx = (cos * -cx + sin * -cy) + 0.0 + cx
    ty = (neg_sin * -cx + cos * -cy) + 0.0 + cy
    return torch.stack([cos, sin, tx, neg_sin, cos, ty], 1)


def affine_matrix(name: str, arg: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 6) float64: the matrix op ``name`` (Rotate, ShearX/Y, TranslateX/Y) hands ``Image.transform``."""
    if name == "Rotate":
        return rotation_matrix(arg, height, width)
    a = arg.double()
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    cols = {
        "ShearX": (one, a, zero, zero, one, zero),
        "ShearY": (one, zero, zero, a, one, zero),
        "TranslateX": (one, zero, a * width, zero, one, zero),
        "TranslateY": (one, zero, zero, zero, one, a * height),
    }
    if name not in cols:
        raise ValueError(f"{name!r} is not a geometric op; expected one of {GEOMETRIC}")
    return torch.stack(cols[name], 1)


# float32 sums of 4 or 16 weighted taps land within this of the exact value; added before
# truncating, it keeps exact integers (flat areas, whole-pixel shifts) from truncating one level low.
_TRUNC_GUARD = 2e-4


def _cubic_weights(d: torch.Tensor) -> list[torch.Tensor]:
    # Pillow's BICUBIC macro (Keys' cubic convolution, a = -1) as weights of the taps at -1, 0, 1, 2.
    d2 = d * d
    d3 = d2 * d
    return [2 * d2 - d - d3, 1 - 2 * d2 + d3, d + d2 - d3, d3 - d2]


def _nearest_fixed(m: list[torch.Tensor], xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Pillow's nearest affine for matrices that are not a pure scale: 16.16 fixed point.
    def fix(v: torch.Tensor) -> torch.Tensor:
        return torch.floor(v * 65536.0 + 0.5).long()

    a0, a1, a3, a4 = fix(m[0]), fix(m[1]), fix(m[3]), fix(m[4])
    a2, a5 = fix(m[2] + m[0] * 0.5 + m[1] * 0.5), fix(m[5] + m[3] * 0.5 + m[4] * 0.5)
    xi, yi = xs.long(), ys.long()  # pixel indices (the centres' integer parts)
    return (a2 + yi * a1 + xi * a0) >> 16, (a5 + yi * a4 + xi * a3) >> 16


def affine(x: torch.Tensor, matrix: torch.Tensor, fill: Sequence[int], interpolation: str = "bicubic") -> torch.Tensor:
    """``Image.transform(size, AFFINE, matrix, resample, fillcolor=fill)`` of each image.

    ``matrix`` (B, 6) maps each output pixel centre to its source point; a source point outside
    the image gives ``fill`` (one value per channel). ``interpolation``: "bicubic" (Pillow's
    a = -1 kernel, interpolated in float32: see the module docstring), "bilinear" or "nearest"
    (Pillow's fixed-point stepping). Source points are computed in float64 as Pillow does.
    """
    b, c, h, w = x.shape
    if len(fill) != c:
        raise ValueError(f"fill has {len(fill)} values but the images have {c} channels")
    dev = x.device
    m = [v.view(b, 1, 1) for v in matrix.to(dev, torch.float64).unbind(1)]
    xs = (torch.arange(w, device=dev, dtype=torch.float64) + 0.5).view(1, 1, w)
    ys = (torch.arange(h, device=dev, dtype=torch.float64) + 0.5).view(1, h, 1)
    sx = (m[0] * xs + m[1] * ys) + m[2]  # (B, H, W), as Pillow's affine_transform
    sy = (m[3] * xs + m[4] * ys) + m[5]
    flat = x.reshape(b, c, h * w)
    if interpolation == "nearest":
        fx, fy = _nearest_fixed(m, xs, ys)
        scale_only = ((m[1] == 0) & (m[3] == 0)).expand(b, h, w)  # Pillow steps these in float64
        fx = torch.where(scale_only, torch.floor(sx).long(), fx)
        fy = torch.where(scale_only, torch.floor(sy).long(), fy)
        inside = (fx >= 0) & (fx < w) & (fy >= 0) & (fy < h)
        idx = (fy.clamp(0, h - 1) * w + fx.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
        val = flat.gather(2, idx).view(b, c, h, w)
    else:
        inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
        fx, fy = torch.floor(sx - 0.5), torch.floor(sy - 0.5)
        # Bilinear's 4 taps are cheap enough in Pillow's float64; bicubic's 16 run in float32.
        dtype = torch.float64 if interpolation == "bilinear" else torch.float32
        dx, dy = ((sx - 0.5) - fx).to(dtype).unsqueeze(1), ((sy - 0.5) - fy).to(dtype).unsqueeze(1)
        fx, fy = fx.long(), fy.long()
        src = flat.to(dtype)

        # Edge pixels repeated, as Pillow's XCLIP/YCLIP: tap offsets -1..2 clamped once each.
        rows = {k: (fy + k).clamp(0, h - 1) * w for k in (-1, 0, 1, 2)}
        cols = {k: (fx + k).clamp(0, w - 1) for k in (-1, 0, 1, 2)}

        def tap(row: int, col: int) -> torch.Tensor:
            idx = (rows[row] + cols[col]).view(b, 1, h * w).expand(b, c, h * w)
            return src.gather(2, idx).view(b, c, h, w)

        if interpolation == "bilinear":
            top, bottom = tap(0, 0), tap(1, 0)
            top = top + (tap(0, 1) - top) * dx
            bottom = bottom + (tap(1, 1) - bottom) * dx
            val = (top + (bottom - top) * dy).trunc_()  # (UINT8)v: v is within 0..255
        elif interpolation == "bicubic":
            wx, wy = _cubic_weights(dx), _cubic_weights(dy)
            val = None
            for i, row in enumerate((-1, 0, 1, 2)):
                acc = tap(row, -1) * wx[0]
                for j, col in enumerate((0, 1, 2), 1):
                    acc = acc.addcmul_(tap(row, col), wx[j])
                val = acc.mul_(wy[i]) if val is None else val.addcmul_(acc, wy[i])
            val = val.add_(_TRUNC_GUARD).clamp_(0, 255).trunc_()
        else:
            raise ValueError(f"interpolation must be 'bicubic', 'bilinear' or 'nearest', got {interpolation!r}")
    fill_t = torch.tensor([float(v) for v in fill], device=dev).view(1, -1, 1, 1)
    return torch.where(inside.unsqueeze(1), val.float(), fill_t).to(torch.uint8)


def apply_op_batch(x: torch.Tensor, name: str, arg: torch.Tensor | None, fill: Sequence[int],
                   interpolation: str = "bicubic") -> torch.Tensor:
    """RandAugment op ``name`` with per-image arguments ``arg`` (from ``op_argument``) on uint8 (B, C, H, W)."""
    if name in GEOMETRIC:
        return affine(x, affine_matrix(name, arg, x.shape[-2], x.shape[-1]), fill, interpolation)
    if name in ENHANCE:
        return enhance(name, x, arg)
    return point_op(name, x, arg)
