"""Random-resized crop, flip and RandAugment of a whole uint8 batch on its device.

The worker path (:class:`~vitkit.data.transforms.TrainTransform`) crops, resizes, flips and
RandAugments each decoded image with PIL in a DataLoader worker. Here the same steps run on a
batch of images stored decoded at one size S x S' (with each image's original size): each crop
box, flip and op is drawn per image by the worker path's rules, from torch's generator on the
batch's device (which the trainer checkpoints), and each pixel is computed as Pillow computes
it (:mod:`vitkit.data.batch_pil`). The crop is one batched resample per axis: Pillow's
antialiased resampling coefficients for each image's box, as per-image matrices.

For stored images at their original size, the pixels equal the worker path's for the same
box, flip and ops, within one level in a few percent of pixels at most (float32 products). For
images stored resized, the box is mapped to the stored pixels and resampled from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError, DataError
from .batch_pil import affine, affine_matrix, apply_op_batch
from .rand_augment import GEOMETRIC, OPS, RandAugmentPolicy, op_argument

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")
_ATTEMPTS = 10
_PRECISION = float(1 << 22)  # Pillow's fixed-point resampling coefficients: 22 fractional bits


def _size2(img_size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if h <= 0 or w <= 0:
        raise ConfigError(f"img_size must be positive, got {img_size}")
    return int(h), int(w)


def _check_interpolation(name: str) -> None:
    if name not in INTERPOLATIONS:
        raise ConfigError(f"interpolation must be one of {INTERPOLATIONS}, got {name!r}")


def sample_crop_boxes(orig_hw: torch.Tensor, scale: Sequence[float], ratio: Sequence[float],
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Random-resized-crop boxes, float64 (B, 4) ``(x0, y0, x1, y1)`` in each image's original pixels.

    The rule of :meth:`~vitkit.data.transforms.TrainTransform.crop_box` (timm's and
    torchvision's): up to 10 attempts draw an area (a fraction uniform in ``scale``) and an
    aspect ratio w/h (log-uniform in ``ratio``) and round the sides to whole pixels; the first
    box that fits (sides of at least one pixel) is placed at a uniform whole-pixel offset; when
    none fits, the largest centred box within ``ratio``. All attempts are drawn at once (4
    uniforms each, from ``generator``; None: torch's default generator on ``orig_hw``'s device)
    and the first that fits is kept, which is the same distribution.

    Args:
        orig_hw: int (B, 2), each image's (height, width).
    """
    dev = orig_hw.device
    hw = orig_hw.to(torch.float64)
    h, w = hw[:, 0], hw[:, 1]
    u = torch.rand(len(hw), _ATTEMPTS, 4, generator=generator, device=dev, dtype=torch.float64)
    target = (h * w).unsqueeze(1) * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    cw = torch.round(torch.sqrt(target * aspect))  # round half to even, as Python's round()
    ch = torch.round(torch.sqrt(target / aspect))
    fits = (cw > 0) & (cw <= w.unsqueeze(1)) & (ch > 0) & (ch <= h.unsqueeze(1))
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first attempt that fits

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.gather(1, first).squeeze(1)

    cw, ch = pick(cw), pick(ch)
    # randint(0, n) for the top, then the left.
    y0 = torch.minimum(torch.floor(pick(u[..., 2]) * (h - ch + 1)), h - ch)
    x0 = torch.minimum(torch.floor(pick(u[..., 3]) * (w - cw + 1)), w - cw)
    in_ratio = w / h
    fw = torch.where(in_ratio > ratio[1], torch.round(h * ratio[1]), w)
    fh = torch.where(in_ratio < ratio[0], torch.round(w / ratio[0]), h)
    ok = fits.any(1)
    cw, ch = torch.where(ok, cw, fw), torch.where(ok, ch, fh)
    x0 = torch.where(ok, x0, torch.floor((w - fw) / 2))
    y0 = torch.where(ok, y0, torch.floor((h - fh) / 2))
    return torch.stack([x0, y0, x0 + cw, y0 + ch], 1)


def _bicubic(t: torch.Tensor) -> torch.Tensor:
    # Pillow's resampling kernel (a = -0.5), term by term.
    t = t.abs()
    near = ((-0.5 + 2.0) * t - (-0.5 + 3.0)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * -0.5
    return torch.where(t < 1.0, near, torch.where(t < 2.0, far, 0.0))


def _triangle(t: torch.Tensor) -> torch.Tensor:
    t = t.abs()
    return torch.where(t < 1.0, 1.0 - t, 0.0)


def _lanczos(t: torch.Tensor) -> torch.Tensor:
    def sinc(v: torch.Tensor) -> torch.Tensor:
        vp = v * math.pi
        return torch.where(v == 0, 1.0, torch.sin(vp) / vp)

    return torch.where((t >= -3.0) & (t < 3.0), sinc(t) * sinc(t / 3), 0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_triangle, 1.0), "lanczos": (_lanczos, 3.0)}


def _axis_weights(lo: torch.Tensor, hi: torch.Tensor, size: int, out: int, interpolation: str) -> torch.Tensor:
    """float32 (B, out, size): resampling ``[lo, hi)`` of each image's axis (``size`` pixels) to ``out`` samples.

    Pillow's ``precompute_coeffs`` for the crop alone: the kernel stretched by the downscale
    factor, cut at the crop's edge pixels and renormalised, each coefficient rounded to 22
    fractional bits. A box in fractional pixels covers the pixels whose centres it contains.
    """
    b, dev = lo.shape[0], lo.device
    scale = (hi - lo) / out  # (B,)
    # Positions are computed from the box's start as Pillow computes them in the cropped image;
    # a whole-pixel start is added exactly.
    base, frac = torch.floor(lo), lo - torch.floor(lo)
    first_px = torch.ceil(lo - 0.5).clamp(0, size - 1)
    last_px = torch.maximum(torch.floor(hi - 0.5) + 1, first_px + 1).clamp(max=size)  # exclusive
    if interpolation == "nearest":
        # Pillow's nearest resize steps from half a step, adding the step once per output pixel.
        steps = scale.unsqueeze(1).repeat(1, out)
        steps[:, 0] = steps[:, 0] * 0.5
        taps = base.unsqueeze(1) + torch.floor(torch.cumsum(steps, 1) + frac.unsqueeze(1))
        taps = taps.clamp(first_px.unsqueeze(1), last_px.unsqueeze(1) - 1)
        weights = torch.zeros(b, out, size, device=dev)
        return weights.scatter_(2, taps.long().unsqueeze(2), 1.0)
    fn, support_px = _FILTERS[interpolation]
    filterscale = scale.clamp(min=1.0)
    support = (support_px * filterscale).view(b, 1, 1)
    center = (torch.arange(out, device=dev, dtype=torch.float64) + 0.5) * scale.unsqueeze(1)  # from lo
    # Enough taps for any box inside the image; those beyond a box's kernel get weight 0.
    ksize = 2 * math.ceil(support_px * max(size / out, 1.0)) + 3
    lo3, center3 = lo.view(b, 1, 1), center.unsqueeze(2)
    first_tap = base.view(b, 1, 1) + torch.floor(((center3 - support) + 0.5) + frac.view(b, 1, 1))
    taps = first_tap + torch.arange(ksize, device=dev, dtype=torch.float64)
    k = fn((((taps - lo3) - center3) + 0.5) * (1.0 / filterscale).view(b, 1, 1))
    k = torch.where((taps >= first_px.view(b, 1, 1)) & (taps < last_px.view(b, 1, 1)), k, 0.0)
    total = torch.zeros_like(k[..., 0])
    for t in range(ksize):  # summed in Pillow's order
        total = total + k[..., t]
    k = torch.where(total.unsqueeze(2) != 0, k / total.unsqueeze(2), k)
    fixed = torch.where(k < 0, torch.trunc(-0.5 + k * _PRECISION), torch.trunc(0.5 + k * _PRECISION))
    weights = torch.zeros(b, out, size, device=dev)
    return weights.scatter_add_(2, taps.clamp(0, size - 1).long(), (fixed / _PRECISION).float())


def _round8(v: torch.Tensor) -> torch.Tensor:
    # Pillow's rounding of a fixed-point sum (half up), then its clip to 0..255; v is ours.
    return v.add_(0.5).floor_().clamp_(0, 255)


def resized_crop_flip(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out_hw: int | Sequence[int],
                      src_scale: torch.Tensor | None = None, interpolation: str = "bicubic") -> torch.Tensor:
    """Crop each image's box, resize it to ``out_hw`` and flip it where asked: uint8 (B, C, out_h, out_w).

    As :meth:`~vitkit.data.transforms.TrainTransform.crop_resize` then a left-right flip: the
    resampling sees only the crop (its kernel cut at the crop's edge pixels and renormalised, as
    Pillow does at an image's edge), horizontally first with the intermediate rounded to uint8.
    Both axes are one batched matrix product each, with each image's own coefficients.

    Args:
        x: uint8 (B, C, S, S') stored images.
        boxes: (B, 4) ``(x0, y0, x1, y1)`` in original pixel coordinates.
        flip: bool (B,): flip that image left-right.
        out_hw: output side, or (height, width).
        src_scale: (B, 2) ``(S / h, S' / w)`` mapping original to stored coordinates; None: the
            stored images are at their original size.
        interpolation: "bicubic", "bilinear", "lanczos" or "nearest".
    """
    _check_interpolation(interpolation)
    b, c, s_h, s_w = x.shape
    out_h, out_w = _size2(out_hw)
    boxes = boxes.to(x.device, torch.float64)
    if src_scale is not None:
        sy, sx = src_scale.to(x.device, torch.float64).unbind(1)
        boxes = boxes * torch.stack([sx, sy, sx, sy], 1)
    wx = _axis_weights(boxes[:, 0], boxes[:, 2], s_w, out_w, interpolation)  # (B, out_w, S')
    wx = torch.where(flip.to(x.device).view(b, 1, 1), wx.flip(1), wx)
    wy = _axis_weights(boxes[:, 1], boxes[:, 3], s_h, out_h, interpolation)  # (B, out_h, S)
    # float32 products round Pillow's integer sums a level the other way where they fall within
    # about 1e-5 of a half (bilinear's midway samples often do); exact sums cost twice the time.
    rows = _round8(torch.bmm(x.reshape(b, c * s_h, s_w).float(), wx.transpose(1, 2)))  # (B, C*S, out_w)
    return _round8(torch.matmul(wy.unsqueeze(1), rows.view(b, c, s_h, out_w))).to(torch.uint8)


class BatchRandAugment(RandAugmentPolicy):
    """RandAugment of a uint8 (B, C, H, W) batch, per image, on the batch's device.

    Each image's ops, magnitudes and signs are drawn as :class:`~vitkit.data.rand_augment.RandAugment`
    draws them (the same :class:`~vitkit.data.rand_augment.RandAugmentPolicy`), and each op is
    computed as Pillow computes it (:mod:`vitkit.data.batch_pil`), on the images that drew it.
    Grouping the images by op reads the drawn op choices to the host once per batch.

    Args:
        spec: e.g. ``"rand-m9-mstd0.5-inc1"`` (see :func:`~vitkit.data.rand_augment.parse_rand_augment`).
        fill: fill for geometric ops, per RGB channel in 0..255 (gray images use their mean).
        translate_pct: the largest translation, as a fraction of the image side.
        interpolation: resampling of the geometric ops: "bicubic", "bilinear" or "nearest"
            ("lanczos" uses bicubic, as PIL's affine transforms do in the worker path).
    """

    def __init__(self, spec: str, fill: Sequence[int] = (124, 116, 104), translate_pct: float = 0.45,
                 interpolation: str = "bicubic"):
        super().__init__(spec, translate_pct)
        _check_interpolation(interpolation)
        fill = tuple(int(v) for v in fill)
        self.fill_rgb = fill * 3 if len(fill) == 1 else fill
        self.fill_gray = round(sum(self.fill_rgb) / len(self.fill_rgb))
        self.interpolation = "bicubic" if interpolation == "lanczos" else interpolation

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (B, C, H, W) -> uint8 (B, C, H, W); draws from ``generator`` (None: torch's default
        generator on ``x``'s device)."""
        return self.apply(x, self.draw(x.shape[0], generator, x.device))

    def apply(self, x: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply ops drawn by :meth:`draw` to uint8 (B, C, H, W) images, step by step."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise DataError(f"RandAugment needs uint8 (B, C, H, W) images with 1 or 3 channels, got "
                            f"{x.dtype} {tuple(x.shape)}")
        fill = (self.fill_gray,) if x.shape[1] == 1 else self.fill_rgb
        height, width = x.shape[-2:]
        chosen = torch.where(draws["applied"], draws["op"], -1).cpu()  # the one host read
        out = x.clone()
        for step in range(chosen.shape[1]):
            geo_idx, geo_matrix = [], []
            for k, name in enumerate(OPS):
                rows = (chosen[:, step] == k).nonzero().squeeze(1)
                if len(rows) == 0:
                    continue
                idx = rows.to(x.device, non_blocking=True)
                arg = op_argument(name, draws["magnitude"][idx, step], draws["negate"][idx, step], self.inc,
                                  self.translate_pct)
                if name in GEOMETRIC:  # one resample for all of this step's geometric ops
                    geo_idx.append(idx)
                    geo_matrix.append(affine_matrix(name, arg, height, width))
                else:
                    out[idx] = apply_op_batch(out[idx], name, arg, fill)
            if geo_idx:
                idx = torch.cat(geo_idx)
                out[idx] = affine(out[idx], torch.cat(geo_matrix), fill, self.interpolation)
        return out

    def __repr__(self) -> str:
        return f"BatchRandAugment({self.spec!r}, fill={self.fill_rgb}, translate_pct={self.translate_pct})"


class BatchGeometry(nn.Module):
    """Random-resized crop, horizontal flip and RandAugment of stored uint8 images, per image, batched.

    The batched counterpart of :class:`~vitkit.data.transforms.TrainTransform` (same arguments,
    same distribution): ``forward(x, orig_hw)`` takes uint8 (B, C, S, S') images stored at one
    size and each image's original (height, width), int (B, 2) (None: the stored size), and
    returns uint8 (B, C, img, img). Every draw comes from torch's default generator on ``x``'s
    device.

    Args:
        img_size: output side, or (H, W).
        scale: range of the crop's area as a fraction of the image.
        ratio: range of the crop's aspect ratio (w / h), sampled log-uniformly.
        hflip: probability of a horizontal flip.
        auto_augment: a RandAugment spec such as ``"rand-m9-mstd0.5-inc1"``; None or "" for none.
        fill: RandAugment's fill for uncovered pixels, per RGB channel in 0..255.
        interpolation: resampling of the crop and of RandAugment's geometric ops (which use
            bicubic when this is "lanczos").
        translate_pct: RandAugment's largest translation, as a fraction of the image side.
    """

    def __init__(self, img_size: int | tuple[int, int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5, auto_augment: str | None = None,
                 fill: Sequence[int] = (124, 116, 104), interpolation: str = "bicubic", translate_pct: float = 0.45):
        super().__init__()
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ConfigError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ConfigError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if not 0 <= hflip <= 1:
            raise ConfigError(f"hflip must be a probability in [0, 1], got {hflip}")
        _check_interpolation(interpolation)
        self.size = _size2(img_size)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.interpolation = interpolation
        self.rand_augment = (
            BatchRandAugment(auto_augment, fill, translate_pct, interpolation) if auto_augment else None
        )

    def forward(self, x: torch.Tensor, orig_hw: torch.Tensor | None = None) -> torch.Tensor:
        b, _, s_h, s_w = x.shape
        orig = (torch.tensor([[s_h, s_w]], device=x.device).expand(b, 2) if orig_hw is None
                else orig_hw.to(x.device))
        boxes = sample_crop_boxes(orig, self.scale, self.ratio)
        flip = torch.rand(b, device=x.device) < self.hflip
        orig = orig.to(torch.float64)
        src_scale = torch.stack([s_h / orig[:, 0], s_w / orig[:, 1]], 1)
        out = resized_crop_flip(x, boxes, flip, self.size, src_scale, self.interpolation)
        return out if self.rand_augment is None else self.rand_augment(out)

    def extra_repr(self) -> str:
        return (f"size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
                f"interpolation={self.interpolation!r}, rand_augment={self.rand_augment}")
