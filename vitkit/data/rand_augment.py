"""RandAugment: the distribution of ops and magnitudes, and the ops on PIL images, per sample.

A spec ``rand-m{M}-n{N}-mstd{S}-inc{0|1}-p{P}-mmax{X}`` means, for every image independently:

- pick N operations uniformly, with replacement, from the 15 below;
- apply each with probability P (default 0.5);
- for each applied op draw its magnitude from ``N(M, S)`` (``S`` > 100: uniform in ``[0, M]``),
  clipped to ``[0, X]`` (X defaults to 10), then map it to the op's argument.

Operations (magnitude ``m`` on the 0..10 scale; ``±`` is a fair coin per application):

==================  ==========================================  ==================================
op                  argument                                    inc1 (increasing severity)
==================  ==========================================  ==================================
AutoContrast        none
Equalize            none
Invert              none
Rotate              ``±30 m/10`` degrees
Posterize           keep ``int(4 m/10)`` bits                   keep ``4 - int(4 m/10)`` bits
Solarize            threshold ``int(256 m/10)``                 threshold ``256 - int(256 m/10)``
SolarizeAdd         add ``min(128, int(110 m/10))`` below 128
Color               factor ``0.1 + 1.8 m/10``                   ``max(0.1, 1 ± 0.9 m/10)``
Contrast            (as Color)                                  (as Color)
Brightness          (as Color; multiplicative)                  (as Color)
Sharpness           (as Color)                                  (as Color)
ShearX / ShearY     ``±0.3 m/10``
TranslateX / Y      ``±translate_pct m/10`` of the image side
==================  ==========================================  ==================================

Geometric ops resample with the transform's interpolation and fill uncovered pixels with
``fill`` (by default the ImageNet mean as 0..255 integers). Grayscale ("L") images work: every
op runs natively on one channel, Color is the identity there (a gray image has no saturation),
and the fill is the mean of the RGB fill values.

:class:`RandAugmentPolicy` holds the draws; :class:`RandAugment` applies them to one PIL image
from a ``random.Random``, and :class:`~vitkit.data.batch_ops.BatchRandAugment` to a uint8 batch
from a torch generator, with the same distribution.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageEnhance, ImageOps

from ..errors import ConfigError

_LEVEL_MAX = 10.0

_SPEC_RE = re.compile(r"rand(-(m\d+(\.\d+)?|n\d+|mstd\d+(\.\d+)?|inc[01]|p\d+(\.\d+)?|mmax\d+(\.\d+)?|w\d+))*")


def parse_rand_augment(spec: str) -> dict:
    """Parse ``"rand-m9-n2-mstd0.5-inc1"`` into ``{"m": 9.0, "n": 2, "mstd": 0.5, "inc": True, "p": 0.5, "mmax": 10.0}``.

    ``mstd`` above 100 becomes ``inf`` (uniform magnitudes in ``[0, m]``).

    Raises:
        ConfigError: the string is not of that form, a value is out of range, or it asks for
            weighted op choice (``-w``), which vitkit does not support.
    """
    if not isinstance(spec, str) or not _SPEC_RE.fullmatch(spec):
        raise ConfigError(
            f"malformed RandAugment spec {spec!r}: expected 'rand' followed by '-m<magnitude 0..10>', "
            f"'-n<ops>', '-mstd<std>', '-inc<0|1>', '-p<prob>', '-mmax<max>' parts, e.g. 'rand-m9-mstd0.5-inc1'"
        )
    out = {"m": 9.0, "n": 2, "mstd": 0.0, "inc": False, "p": 0.5, "mmax": _LEVEL_MAX}
    for part in spec.split("-")[1:]:
        if part.startswith("mstd"):
            out["mstd"] = float(part[4:]) if float(part[4:]) <= 100 else math.inf
        elif part.startswith("mmax"):
            out["mmax"] = float(part[4:])
        elif part.startswith("m"):
            out["m"] = float(part[1:])
        elif part.startswith("n"):
            out["n"] = int(part[1:])
        elif part.startswith("inc"):
            out["inc"] = part == "inc1"
        elif part.startswith("p"):
            out["p"] = float(part[1:])
        else:
            raise ConfigError(
                f"RandAugment spec {spec!r}: weighted op choice ({part!r}) is not supported; "
                f"remove that part to choose ops uniformly"
            )
    if not 0 <= out["m"] <= out["mmax"]:
        raise ConfigError(f"RandAugment spec {spec!r}: magnitude m must be in 0..{out['mmax']:g}, got {out['m']:g}")
    if not 1 <= out["n"] <= 15:
        raise ConfigError(f"RandAugment spec {spec!r}: n (ops per image) must be in 1..15, got {out['n']}")
    if not 0 <= out["p"] <= 1:
        raise ConfigError(f"RandAugment spec {spec!r}: p (probability per op) must be in 0..1, got {out['p']:g}")
    return out


# ---- operations: (image, argument, geometry kwargs) -> image ----------------------------------


def _affine(img: Image.Image, matrix: tuple, geo: dict) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=geo["resample"], fillcolor=geo["fill"])


def _solarize_add(img: Image.Image, add: int, _geo) -> Image.Image:
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: int, _geo) -> Image.Image:
    # Keeping 0 bits (magnitude 10 in the increasing variant) gives black; Pillow >= 11 rejects
    # bits=0 in ImageOps.posterize, hence the explicit table.
    keep = 0xFF & ~(2 ** (8 - bits) - 1) if bits < 8 else 0xFF
    return img.point([i & keep for i in range(256)] * len(img.getbands()))


_APPLY: dict[str, Callable] = {
    "AutoContrast": lambda img, _a, _g: ImageOps.autocontrast(img),
    "Equalize": lambda img, _a, _g: ImageOps.equalize(img),
    "Invert": lambda img, _a, _g: ImageOps.invert(img),
    "Rotate": lambda img, deg, g: img.rotate(deg, resample=g["resample"], fillcolor=g["fill"]),
    "Posterize": _posterize,
    "Solarize": lambda img, thresh, _g: ImageOps.solarize(img, thresh),
    "SolarizeAdd": _solarize_add,
    "Color": lambda img, f, _g: ImageEnhance.Color(img).enhance(f),
    "Contrast": lambda img, f, _g: ImageEnhance.Contrast(img).enhance(f),
    "Brightness": lambda img, f, _g: ImageEnhance.Brightness(img).enhance(f),
    "Sharpness": lambda img, f, _g: ImageEnhance.Sharpness(img).enhance(f),
    "ShearX": lambda img, s, g: _affine(img, (1, s, 0, 0, 1, 0), g),
    "ShearY": lambda img, s, g: _affine(img, (1, 0, 0, s, 1, 0), g),
    "TranslateX": lambda img, t, g: _affine(img, (1, 0, t * img.width, 0, 1, 0), g),
    "TranslateY": lambda img, t, g: _affine(img, (1, 0, 0, 0, 1, t * img.height), g),
}
OPS = tuple(_APPLY)

# Ops whose argument takes a random sign (always, or only in the increasing variant).
_SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}
_ENHANCE = {"Color", "Contrast", "Brightness", "Sharpness"}
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def takes_sign(name: str, increasing: bool) -> bool:
    """Whether op ``name`` draws a fair coin for the sign of its argument."""
    return name in _SIGNED or (increasing and name in _ENHANCE)


def _floor(v):
    # int() of a non-negative level: an int for one image, floored elementwise for a batch.
    return v.floor() if isinstance(v, torch.Tensor) else int(v)


def _clip(v, lo: float | None = None, hi: float | None = None):
    if isinstance(v, torch.Tensor):
        return v.clamp(lo, hi)
    v = v if hi is None else min(hi, v)
    return v if lo is None else max(lo, v)


def op_argument(name: str, magnitude, negate, increasing: bool, translate_pct: float = 0.45):
    """The argument op ``name`` gets at ``magnitude`` (0..10); ``negate`` flips signed ones.

    ``magnitude`` and ``negate`` are a float and a bool for one image, or a float64 tensor and a
    bool tensor of one shape for a batch (then the argument is a float64 tensor of that shape:
    the same numbers, computed in the same order).
    """
    level = magnitude / _LEVEL_MAX
    if isinstance(negate, torch.Tensor):
        sign = 1.0 - 2.0 * negate.to(level.dtype if isinstance(level, torch.Tensor) else torch.float64)
    else:
        sign = -1.0 if negate else 1.0
    if name == "Rotate":
        return sign * 30.0 * level
    if name in ("ShearX", "ShearY"):
        return sign * 0.3 * level
    if name in ("TranslateX", "TranslateY"):
        return sign * translate_pct * level
    if name == "Posterize":
        bits = _floor(4 * level)
        return 4 - bits if increasing else bits
    if name == "Solarize":
        thresh = _clip(_floor(256 * level), hi=256)
        return 256 - thresh if increasing else thresh
    if name == "SolarizeAdd":
        return _clip(_floor(110 * level), hi=128)
    if name in _ENHANCE:
        # Increasing: moving away from 1 (the identity) either way is the stronger change.
        return _clip(1.0 + sign * 0.9 * level, lo=0.1) if increasing else 0.1 + 1.8 * level
    return None


def apply_op(img: Image.Image, name: str, arg, fill, resample) -> Image.Image:
    """Apply op ``name`` with argument ``arg`` (see :func:`op_argument`)."""
    return _APPLY[name](img, arg, {"fill": fill, "resample": resample})


class RandAugmentPolicy:
    """What RandAugment draws for each image: the one definition of the distribution.

    The PIL path (:class:`RandAugment`, one image from a ``random.Random``) and the batched path
    (:class:`~vitkit.data.batch_ops.BatchRandAugment`, a batch from a torch generator) both
    derive from it: ``n`` ops chosen uniformly with replacement from :data:`OPS`, each applied
    with probability ``p``, with the magnitude of :meth:`magnitude` and the sign coin of
    :func:`takes_sign`, mapped to its argument by :func:`op_argument`.

    Args:
        spec: e.g. ``"rand-m9-mstd0.5-inc1"`` (see :func:`parse_rand_augment`).
        translate_pct: the largest translation, as a fraction of the image side.
    """

    def __init__(self, spec: str, translate_pct: float = 0.45):
        cfg = parse_rand_augment(spec)
        self.spec = spec
        self.m, self.n, self.mstd, self.inc, self.p, self.mmax = (
            cfg["m"], cfg["n"], cfg["mstd"], cfg["inc"], cfg["p"], cfg["mmax"],
        )
        self.translate_pct = translate_pct

    def magnitude(self, rng: random.Random) -> float:
        m = self.m
        if self.mstd == math.inf:
            m = rng.uniform(0, self.m)
        elif self.mstd > 0:
            m = rng.gauss(self.m, self.mstd)
        return max(0.0, min(m, self.mmax))

    def plan(self, rng: random.Random) -> list[tuple[str, object]]:
        """The ops this image gets, as ``(name, argument)``, in order (skipped ops left out)."""
        names = [OPS[rng.randrange(len(OPS))] for _ in range(self.n)]
        out = []
        for name in names:
            if rng.random() >= self.p:
                continue
            m = self.magnitude(rng)
            negate = takes_sign(name, self.inc) and rng.random() < 0.5
            out.append((name, op_argument(name, m, negate, self.inc, self.translate_pct)))
        return out

    def magnitudes(self, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """:meth:`magnitude` for a whole batch: float64 of ``shape``."""
        kw = {"generator": generator, "device": device, "dtype": torch.float64}
        if self.mstd == math.inf:
            m = self.m * torch.rand(shape, **kw)  # random.uniform(0, m) is 0 + (m - 0) * random()
        elif self.mstd > 0:
            m = self.m + self.mstd * torch.randn(shape, **kw)
        else:
            m = torch.full(shape, self.m, dtype=torch.float64, device=device)
        return m.clamp(0.0, self.mmax)

    def draw(self, batch: int, generator: torch.Generator | None = None, device=None) -> dict[str, torch.Tensor]:
        """:meth:`plan` for ``batch`` images at once, as (batch, n) tensors.

        ``op`` (int64 index into :data:`OPS`), ``applied`` (bool), ``magnitude`` (float64) and
        ``negate`` (bool, False for ops without a sign). Every draw is made whether or not it is
        used, so a batch always consumes the generator by the same amount.
        """
        shape = (batch, self.n)
        op = torch.randint(len(OPS), shape, generator=generator, device=device)
        applied = torch.rand(shape, generator=generator, device=device, dtype=torch.float64) < self.p
        magnitude = self.magnitudes(shape, generator, device)
        coin = torch.rand(shape, generator=generator, device=device, dtype=torch.float64) < 0.5
        signed = torch.tensor([takes_sign(name, self.inc) for name in OPS], device=device)
        return {"op": op, "applied": applied, "magnitude": magnitude, "negate": coin & signed[op]}


class RandAugment(RandAugmentPolicy):
    """Per-sample RandAugment: ``ra(img, rng) -> img`` on PIL "RGB" or "L" images.

    Args:
        spec: e.g. ``"rand-m9-mstd0.5-inc1"`` (see :func:`parse_rand_augment`).
        fill: fill for geometric ops, per RGB channel in 0..255 (gray images use their mean).
        translate_pct: the largest translation, as a fraction of the image side.
        resample: PIL resampling filter for geometric ops.
    """

    def __init__(
        self,
        spec: str,
        fill: Sequence[int] = (124, 116, 104),
        translate_pct: float = 0.45,
        resample: int = Image.Resampling.BICUBIC,
    ):
        super().__init__(spec, translate_pct)
        self.fill_rgb = tuple(int(v) for v in fill)
        self.fill_gray = round(sum(self.fill_rgb) / len(self.fill_rgb))
        self.resample = resample

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        fill = self.fill_gray if img.mode == "L" else self.fill_rgb
        for name, arg in self.plan(rng):
            img = apply_op(img, name, arg, fill, self.resample)
        return img

    def __repr__(self) -> str:
        return f"RandAugment({self.spec!r}, fill={self.fill_rgb}, translate_pct={self.translate_pct})"
