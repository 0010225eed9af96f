"""Mixup / CutMix on a batch, with label smoothing, producing soft targets.

Batch mode: one mixing coefficient per batch; each image is mixed with the image at the
mirrored position (``x.flip(0)``), so no second batch is needed. Randomness comes from torch's
global generator.
"""

from __future__ import annotations

import math

import torch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) int labels → (B, K) float targets: ``1 - smoothing + smoothing / K`` on the label, ``smoothing / K`` elsewhere."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(lam: float, height: int, width: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """A box (y0, y1, x0, x1) covering about ``1 - lam`` of the image, centred uniformly, clipped at the borders."""
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(0, height, (), generator=generator))
    cx = int(torch.randint(0, width, (), generator=generator))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    return y0, y1, x0, x1


class Mixup:
    """Mix a batch dict in place of its ``"image"`` and add soft ``"target"`` (B, K) summing to 1.

    Args:
        mixup_alpha: Beta(alpha, alpha) for mixup's coefficient; 0 disables mixup.
        cutmix_alpha: Beta(alpha, alpha) for cutmix's coefficient; 0 disables cutmix.
        prob: probability that a batch is mixed at all (otherwise only smoothed targets).
        switch_prob: with both enabled, the probability of cutmix rather than mixup.
        label_smoothing: smoothing applied to both one-hot targets before mixing.
        num_classes: K.

    CutMix's coefficient is corrected to the area actually pasted, since a box clipped at the
    border covers less than ``1 - lam`` of the image.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"alphas must be >= 0, got mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}")
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes

    def _beta(self, alpha: float) -> float:
        return float(torch.distributions.Beta(alpha, alpha).sample())

    def sample(self) -> tuple[float, bool]:
        """(lam, use_cutmix) for one batch; lam = 1 means no mixing."""
        if self.prob <= 0 or float(torch.rand(())) >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = float(torch.rand(())) < self.switch_prob
        elif self.cutmix_alpha > 0:
            use_cutmix = True
        elif self.mixup_alpha > 0:
            use_cutmix = False
        else:
            return 1.0, False
        return self._beta(self.cutmix_alpha if use_cutmix else self.mixup_alpha), use_cutmix

    def __call__(self, batch: dict) -> dict:
        x, y = batch["image"], batch["label"]
        if not x.is_floating_point():
            raise TypeError(f"Mixup needs float images (run BatchAugment/Normalize first), got {x.dtype}")
        lam, use_cutmix = self.sample()
        if lam < 1.0:
            if use_cutmix:
                y0, y1, x0, x1 = cutmix_box(lam, x.shape[-2], x.shape[-1])
                x = x.clone()
                x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / (x.shape[-2] * x.shape[-1])
            else:
                x = x * lam + x.flip(0) * (1.0 - lam)
        t = smooth_one_hot(y, self.num_classes, self.label_smoothing)
        target = t * lam + t.flip(0) * (1.0 - lam)
        return {**batch, "image": x, "target": target}
