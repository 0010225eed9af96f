"""Dense losses: class weights and soft Dice for segmentation; MiDaS's scale-and-shift-invariant
loss with gradient matching and Eigen's scale-invariant log loss for depth.

Depth maps are (B, H, W) or (B, 1, H, W); a pixel is valid where ``mask`` is True (the
objectives pass ``target > 0``: 0 marks an invalid depth).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine.evaluators import align_least_squares
from ..errors import ConfigError

CLASS_WEIGHTS = ("none", "inverse", "inverse_sqrt", "median_frequency")
SSI_VARIANTS = ("trim", "mae", "mse")

__all__ = [
    "CLASS_WEIGHTS",
    "SSI_VARIANTS",
    "align_least_squares",
    "class_weights",
    "dice_loss",
    "gradient_matching_loss",
    "median_normalise",
    "silog_loss",
    "ssi_loss",
]


# ---------------------------------------------------------------- segmentation


def class_weights(spec: str | Sequence[float] | None, num_classes: int, class_counts=None) -> Tensor | None:
    """Per-class cross-entropy weights (C,), or None for unweighted.

    ``spec``: "none"/None; an explicit list of ``num_classes`` weights; or a rule on the class
    frequencies freq_c from ``class_counts``: "inverse" (1 / freq_c), "inverse_sqrt"
    (1 / sqrt(freq_c)), "median_frequency" (SegNet's median frequency balancing,
    median(freq) / freq_c). ``class_counts`` is a list of pixel counts per class (freq_c =
    count_c / all pixels), or ``{"pixels": [...], "image_pixels": [...]}`` where
    image_pixels_c counts the pixels of the images that contain class c (SegNet's exact freq_c =
    pixels_c / image_pixels_c). "inverse" and "inverse_sqrt" are scaled to mean 1 over the
    classes seen; a class never seen in the counts gets the largest weight of the others.
    """
    if spec is None or (isinstance(spec, str) and spec == "none"):
        return None
    if not isinstance(spec, str):
        w = torch.as_tensor([float(v) for v in spec], dtype=torch.float32)
        if w.numel() != num_classes or (w < 0).any():
            raise ConfigError(
                f"objective.class_weights has {w.numel()} weight(s) {w.tolist()}: give {num_classes} non-negative "
                f"numbers (one per class), or one of {', '.join(CLASS_WEIGHTS)}"
            )
        return w
    if spec not in CLASS_WEIGHTS:
        raise ConfigError(f"objective.class_weights={spec!r} is not one of {', '.join(CLASS_WEIGHTS)} or a list of weights")
    if class_counts is None:
        raise ConfigError(
            f"objective.class_weights={spec} needs the class pixel counts of the training data, which this run "
            "did not provide: use class_weights=none or an explicit list"
        )
    if isinstance(class_counts, dict):
        pixels = torch.as_tensor(class_counts["pixels"], dtype=torch.float64)
        totals = class_counts.get("image_pixels")
        totals = torch.as_tensor(totals, dtype=torch.float64) if totals is not None else pixels.sum().expand_as(pixels)
    else:
        pixels = torch.as_tensor(class_counts, dtype=torch.float64)
        totals = pixels.sum().expand_as(pixels)
    if pixels.numel() != num_classes:
        raise ConfigError(f"class_counts has {pixels.numel()} entries for {num_classes} classes")
    seen = pixels > 0
    if not seen.any():
        raise ConfigError("class_weights: no class has any pixel in class_counts: check the training masks")
    freq = torch.where(seen, pixels / totals.clamp_min(1), torch.ones_like(pixels))
    if spec == "median_frequency":
        w = freq[seen].median() / freq
    else:
        w = 1.0 / freq if spec == "inverse" else freq.rsqrt()
        w = w / w[seen].mean()
    w[~seen] = w[seen].max()
    return w.float()


def dice_loss(logits: Tensor, target: Tensor, ignore_index: int = 255, smooth: float = 1.0,
              exponent: float = 2.0) -> Tensor:
    """Multiclass soft Dice (V-Net; mmseg's ``DiceLoss``): 1 - (2 sum p g + s) / (sum p^e + sum g^e + s).

    Computed per sample and class over the softmax probabilities ``p`` of ``logits`` (B, C, H, W)
    and the one-hot ``target`` (B, H, W); pixels equal to ``ignore_index`` count in neither sum.
    The mean over classes and samples.
    """
    c = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)  # (B, 1, H, W)
    prob = logits.float().softmax(1) * valid
    onehot = F.one_hot(torch.where(valid[:, 0], target, 0).long(), c).permute(0, 3, 1, 2) * valid
    num = 2 * (prob * onehot).sum((2, 3)) + smooth
    den = prob.pow(exponent).sum((2, 3)) + onehot.float().pow(exponent).sum((2, 3)) + smooth
    return (1 - num / den).mean()


# ---------------------------------------------------------------- depth


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _maps(pred: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # (B, H, W) float prediction and target, (B, H, W) bool mask, whatever the channel dim.
    shape = (target.shape[0], *target.shape[-2:])
    return pred.reshape(shape).float(), target.reshape(shape).float(), mask.reshape(shape).bool()


def median_normalise(d: Tensor, mask: Tensor) -> Tensor:
    """MiDaS's robust alignment (eq. 5-6): (d - median) / mean |d - median| per image over valid pixels.

    The median is the lower one for an even count (``torch.median``). Returns (B, N) flattened.
    """
    d, mask = _flat(d), _flat(mask)
    nan = torch.full_like(d, float("nan"))
    t = torch.where(mask, d, nan).nanmedian(1, keepdim=True).values.nan_to_num(0.0)
    m = mask.sum(1, keepdim=True).clamp_min(1)
    s = ((d - t).abs() * mask).sum(1, keepdim=True) / m
    return (d - t) / s.clamp_min(1e-8)


def _aligned_pair(pred: Tensor, target: Tensor, mask: Tensor, variant: str) -> tuple[Tensor, Tensor]:
    if variant == "mse":
        return _flat(align_least_squares(pred, target, mask)), _flat(target)
    return median_normalise(pred, mask), median_normalise(target, mask)


def ssi_loss(pred: Tensor, target: Tensor, mask: Tensor, variant: str = "trim", trim: float = 0.2) -> Tensor:
    """MiDaS's scale-and-shift-invariant loss (Ranftl et al. 2020, eq. 1-7), mean over images.

    ``variant``: "trim" (L_ssitrim, the paper's main results: both maps normalised by median and
    mean absolute deviation, mean absolute error over the ``1 - trim`` smallest residuals),
    "mae" (the same without trimming, L_ssimae), or "mse" (L_ssimse: the prediction aligned to
    the target by per-image least-squares scale and shift, squared error). Each image's loss is
    1/(2M) of the summed residuals, M its valid pixel count; images without valid pixels are left
    out.
    """
    if variant not in SSI_VARIANTS:
        raise ConfigError(f"objective.ssi={variant!r} is not one of {', '.join(SSI_VARIANTS)}")
    pred, target, mask = _maps(pred, target, mask)
    p, t = _aligned_pair(pred, target, mask, variant)
    mask = _flat(mask)
    m = mask.sum(1)
    r = (p - t).abs() if variant != "mse" else (p - t).square()
    if variant == "trim":
        keep = (m.double() * (1 - trim)).floor().long()  # U_m of each image
        r = torch.where(mask, r, torch.full_like(r, float("inf"))).sort(1).values
        kept = torch.arange(r.shape[1], device=r.device)[None] < keep[:, None]
        per_image = torch.where(kept, r, torch.zeros_like(r)).sum(1)
    else:
        per_image = (r * mask).sum(1)
    has = m > 0
    if not has.any():
        return pred.sum() * 0.0
    return (per_image[has] / (2 * m[has])).mean()


def gradient_matching_loss(pred: Tensor, target: Tensor, mask: Tensor, variant: str = "trim",
                           scales: int = 4) -> Tensor:
    """MiDaS's multi-scale gradient matching term L_reg (eq. 11), mean over images.

    On the residual R = aligned prediction - aligned target (aligned as in :func:`ssi_loss`'s
    ``variant``), the sum of |grad_x R| + |grad_y R| over pixel pairs valid at both ends, at
    ``scales`` levels that halve the resolution (every 2^k-th pixel), each divided by the
    image's valid pixel count at that level (the MiDaS authors' published loss, image-based).
    """
    pred, target, mask2 = _maps(pred, target, mask)
    p, t = _aligned_pair(pred, target, mask2, variant)
    diff = ((p - t) * _flat(mask2)).reshape(target.shape)
    total = pred.new_zeros(target.shape[0])
    counted = torch.zeros(target.shape[0], dtype=torch.bool, device=pred.device)
    for k in range(scales):
        step = 2**k
        r, m = diff[:, ::step, ::step], mask2[:, ::step, ::step].float()
        gx = (r[:, :, 1:] - r[:, :, :-1]).abs() * m[:, :, 1:] * m[:, :, :-1]
        gy = (r[:, 1:, :] - r[:, :-1, :]).abs() * m[:, 1:, :] * m[:, :-1, :]
        n = m.sum((1, 2))
        total = total + (gx.sum((1, 2)) + gy.sum((1, 2))) / n.clamp_min(1)
        counted |= n > 0
    if not counted.any():
        return pred.sum() * 0.0
    return total[counted].mean()


def silog_loss(pred: Tensor, target: Tensor, mask: Tensor, lam: float = 0.85, sqrt: bool = True,
               eps: float = 1e-3) -> Tensor:
    """Eigen et al.'s scale-invariant log loss over the valid pixels of the batch.

    With d = log pred - log target: mean(d^2) - lam * mean(d)^2 (Eigen et al. 2014 train with
    lam=0.5; lam=1 is fully scale-invariant). ``sqrt``: BTS's and AdaBins' form, 10 * sqrt(...)
    with lam=0.85. ``pred`` is clamped to ``eps`` (metres) before the log.
    """
    pred, target, mask = _maps(pred, target, mask)
    if not mask.any():
        return pred.sum() * 0.0
    d = pred[mask].clamp_min(eps).log() - target[mask].log()
    loss = d.square().mean() - lam * d.mean().square()
    return 10.0 * loss.clamp_min(0).sqrt() if sqrt else loss
