"""Batched, on-device augmentation and normalisation of uint8 batches.

The per-sample transforms in the DataLoader workers produce uint8 (B, C, H, W); here the whole
batch is converted to float, augmented (RandAugment, colour jitter), normalised and randomly
erased in a few batched tensor ops on the training device.

RandAugment strings follow the common ``rand-m{M}-n{N}-mstd{S}-inc{0|1}`` form (M on a 0..10
scale, default N=2, S=0, inc=0) and map onto kornia's ``RandAugment``:

- kornia's magnitude runs over (0, 30) exclusive, so ``m = 3 * M`` clamped to [0.5, 29.5];
- ``mstd`` > 0 draws a new magnitude ``N(M, mstd)`` (clipped to 0..10) before every batch, by
  setting the module's ``m`` attribute, which kornia reads at each call;
- ``inc1`` replaces the colour/contrast/brightness/sharpness range (0.1, 1.9), whose mid
  magnitude is the identity, by (1.0, 1.9), so severity increases with the magnitude;
  posterize already grows more severe with magnitude in kornia's policy. kornia requires an
  increasing range for solarize, so its threshold keeps kornia's direction;
- kornia picks the N operations once per call, for the whole batch (each image still gets its
  own random sign and probability); calling per sub-batch would add variety at a large cost
  in speed.

Randomness is drawn from torch's global generator (the trainer checkpoints its state).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RAND_RE = re.compile(r"rand(-(m\d+(\.\d+)?|n\d+|mstd\d+(\.\d+)?|inc[01]|w\d+))*")


def parse_rand_augment(spec: str) -> dict:
    """Parse ``"rand-m9-n2-mstd0.5-inc1"`` into ``{"m": 9.0, "n": 2, "mstd": 0.5, "inc": True}``.

    Raises:
        ValueError: the string is not of that form, or a value is out of range.
    """
    if not isinstance(spec, str) or not _RAND_RE.fullmatch(spec):
        raise ValueError(
            f"malformed RandAugment spec {spec!r}: expected 'rand' followed by '-m<magnitude 0..10>', "
            f"'-n<ops>', '-mstd<std>', '-inc<0|1>' parts, e.g. 'rand-m9-mstd0.5-inc1'"
        )
    out = {"m": 9.0, "n": 2, "mstd": 0.0, "inc": False}
    for part in spec.split("-")[1:]:
        if part.startswith("mstd"):
            out["mstd"] = float(part[4:])
        elif part.startswith("m"):
            out["m"] = float(part[1:])
        elif part.startswith("n"):
            out["n"] = int(part[1:])
        elif part.startswith("inc"):
            out["inc"] = part == "inc1"
        else:
            raise ValueError(f"RandAugment spec {spec!r}: weighted op choice ({part!r}) is not supported")
    if not 0 <= out["m"] <= 10:
        raise ValueError(f"RandAugment spec {spec!r}: magnitude m must be in 0..10, got {out['m']}")
    if not 1 <= out["n"] <= 14:
        raise ValueError(f"RandAugment spec {spec!r}: n (ops per image) must be in 1..14, got {out['n']}")
    return out


def _per_channel(values: Sequence[float], channels: int, what: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1 and len(values) == 3:
        return [sum(values) / 3]  # RGB statistics applied to a grayscale model: their average
    raise ValueError(f"{what} has {len(values)} values but the images have {channels} channels")


class Normalize(nn.Module):
    """uint8 or float-in-[0, 1] batch → float ``(x - mean) / std``; accepts a tensor or a batch dict."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.mean, self.std = tuple(mean), tuple(std)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 or float → float32 normalised (B, C, H, W)."""
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        c = x.shape[1]
        mean = torch.tensor(_per_channel(self.mean, c, "mean"), device=x.device).view(1, c, 1, 1)
        std = torch.tensor(_per_channel(self.std, c, "std"), device=x.device).view(1, c, 1, 1)
        return (x - mean) / std

    def forward(self, batch):
        if isinstance(batch, torch.Tensor):
            return self.normalize(batch)
        return {**batch, "image": self.normalize(batch["image"])}


class BatchAugment(Normalize):
    """Batched train augmentation: uint8 (B, C, H, W) → float normalised (B, C, H, W).

    Order: RandAugment and colour jitter on [0, 1] images, then normalisation, then random
    erasing with zeros (the dataset mean after normalisation), so erased patches carry no colour.

    Args:
        mean, std: normalisation statistics (per channel, or RGB averaged for 1 channel).
        auto_augment: a RandAugment spec (see :func:`parse_rand_augment`) or None.
        color_jitter: brightness/contrast/saturation strength; 0 disables it.
        re_prob: per-image probability of random erasing; 0 disables it.
        device: where to run; the batch is moved there.
    """

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.0,
        re_prob: float = 0.25,
        device: torch.device | str | None = None,
    ):
        super().__init__(mean, std)
        import kornia.augmentation as K
        from kornia.augmentation.auto import RandAugment
        from kornia.augmentation.auto.rand_augment.rand_augment import default_policy

        self.device = torch.device(device) if device is not None else None
        self.rand_cfg = parse_rand_augment(auto_augment) if auto_augment else None
        self.rand_augment = None
        if self.rand_cfg is not None:
            policy = default_policy
            if self.rand_cfg["inc"]:
                enhance = ("color", "contrast", "brightness", "sharpness")
                policy = [[(name, 1.0, 1.9)] if name in enhance else [(name, lo, hi)] for [(name, lo, hi)] in policy]
            self.rand_augment = RandAugment(n=self.rand_cfg["n"], m=self._kornia_m(self.rand_cfg["m"]), policy=policy)
        self.color_jitter = (
            K.ColorJitter(color_jitter, color_jitter, color_jitter, 0.0, p=1.0) if color_jitter > 0 else None
        )
        self.erasing = K.RandomErasing(p=re_prob, scale=(0.02, 1 / 3), ratio=(0.3, 3.3), value=0.0) if re_prob > 0 else None

    @staticmethod
    def _kornia_m(m: float) -> float:
        return min(max(3.0 * m, 0.5), 29.5)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 → (B, C, H, W) float32 augmented and normalised."""
        if self.device is not None:
            x = x.to(self.device, non_blocking=True)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        c = x.shape[1]
        if self.rand_augment is not None or self.color_jitter is not None:
            # Colour ops need RGB; a grayscale image stays gray through them, so run on 3 copies.
            x3 = x.expand(-1, 3, -1, -1).contiguous() if c == 1 else x
            if self.rand_augment is not None:
                if self.rand_cfg["mstd"] > 0:
                    m = float(torch.normal(self.rand_cfg["m"], self.rand_cfg["mstd"], ()).clamp(0, 10))
                    self.rand_augment.m = self._kornia_m(m)
                x3 = self.rand_augment(x3)
            if self.color_jitter is not None:
                x3 = self.color_jitter(x3)
            x = x3.mean(dim=1, keepdim=True) if c == 1 else x3
        x = self.normalize(x.clamp_(0, 1))
        if self.erasing is not None:
            x = self.erasing(x)
        return x

    def forward(self, batch):
        if isinstance(batch, torch.Tensor):
            return self.augment(batch)
        return {**batch, "image": self.augment(batch["image"])}
