"""The batched crop, flip and RandAugment against the PIL worker path.

References: PIL itself on a fixed image (each op's pixels; ``TrainTransform.crop_resize`` for
the crop), and the worker path's draws (``TrainTransform.crop_box``, ``RandAugment.plan``, both
checked against timm in test_augment_parity.py). Distribution tolerances come from the binomial
standard deviation (5 sigma) and the two-sample Kolmogorov-Smirnov critical value (alpha 1e-3).
"""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import RandAugment, TrainTransform, pil_to_uint8, sample_rng
from vitkit.data.batch_ops import BatchGeometry, BatchRandAugment, resized_crop_flip, sample_crop_boxes
from vitkit.data.batch_pil import apply_op_batch
from vitkit.data.rand_augment import GEOMETRIC, OPS, apply_op, op_argument, takes_sign
from vitkit.errors import ConfigError, DataError

FILL = (124, 116, 104)
GRAY_FILL = round(sum(FILL) / 3)
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST}
# The batched resize's float32 products against Pillow's integer sums: one level off where a sum
# falls within about 1e-5 of a half. Bilinear's midway samples make that common (up to 5.7% of an
# image's pixels here); bicubic and lanczos up to 0.5%.
RESIZE_TOL = {"bilinear": 0.08, "bicubic": 0.01, "lanczos": 0.01, "nearest": 0.0}
# Bicubic geometric ops interpolate in float32, Pillow in float64: a value that is a whole number in
# exact arithmetic (1 in 125 for a shift of 0.4 px) truncates either way with either rounding.
AFFINE_TOL = 0.01


def _image(mode: str = "RGB", size=(40, 36), seed: int = 0, noise: int = 50) -> Image.Image:
    """Gradients, stripes, a bright block and noise: every op changes something."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    arr = np.stack([(3 * xx + 4 * yy) % 256, (9 * yy) % 256, (xx * yy + 40) % 256], -1) * 0.75
    arr = arr + rng.integers(0, noise + 1, (h, w, 3))
    arr[h // 5 : h // 2, w // 3 : (2 * w) // 3] = 245
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    return img.convert("L") if mode == "L" else img


def _batch(imgs) -> torch.Tensor:
    return torch.stack([pil_to_uint8(im) for im in imgs])


def _hwc(t: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) tensor -> the array ``np.asarray`` gives for the PIL image."""
    arr = t.permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def _mismatch(got: np.ndarray, want: np.ndarray) -> tuple[int, float]:
    diff = np.abs(got.astype(np.int16) - np.asarray(want, np.int16))
    return int(diff.max()), float((diff > 0).mean())


def _ks(a, b) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and its critical value at alpha = 1e-3."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()
    return d, math.sqrt(-math.log(1e-3 / 2) / 2) * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))


def _close(a: float, b: float, p: float, n: int, z: float = 5.0) -> bool:
    """Two binomial proportions from n trials each agree within z combined standard deviations."""
    return abs(a - b) <= z * math.sqrt(2 * p * (1 - p) / n)


# ---- crop boxes ---------------------------------------------------------------------------------


class _Feed:
    """A ``random.Random`` stand-in handing ``crop_box`` given uniforms: per attempt (area, aspect, top, left)."""

    def __init__(self, u):
        self.u, self.calls, self.ints = u, 0, 0

    def uniform(self, a, b):
        v = self.u[self.calls // 2][self.calls % 2]
        self.calls += 1
        return a + (b - a) * v

    def randint(self, a, b):
        v = self.u[(self.calls - 1) // 2][2 + self.ints]
        self.ints += 1
        return a + math.floor(v * (b - a + 1))


@pytest.mark.parametrize("scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 1.0), (0.2, 5.0))])
def test_crop_boxes_follow_crop_box_rule(scale, ratio):
    """Fed the same uniforms, crop_box (attempts, rounding, offsets, centred fallback) gives the same boxes."""
    gen = np.random.default_rng(1)
    sizes = [(h, w) for h, w in gen.integers(1, 300, (1500, 2))]
    sizes += [(20, 120), (120, 20), (1, 1), (2, 50), (50, 2), (3, 3)] * 50  # the fallback's cases
    hw = torch.tensor(sizes, dtype=torch.int64)
    boxes = sample_crop_boxes(hw, scale, ratio, generator=torch.Generator().manual_seed(7))
    u = torch.rand(len(hw), 10, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64).tolist()
    tf = TrainTransform(16, scale=scale, ratio=ratio)
    fallback = 0
    for i, (h, w) in enumerate(sizes):
        feed = _Feed(u[i])
        want = tf.crop_box(int(w), int(h), feed)
        fallback += feed.ints == 0
        assert tuple(int(v) for v in boxes[i].tolist()) == want, (i, h, w)
        assert boxes[i].tolist() == [float(v) for v in want]  # whole pixels
    assert 50 < fallback < len(sizes) - 50  # both branches exercised


@pytest.mark.parametrize("image", [(40, 36), (120, 20), (9, 300)])
def test_crop_box_distribution_matches_worker_path(image):
    """Box area, aspect, position and the fallback rate agree with TrainTransform's own generator."""
    n, (w, h) = 4000, image
    tf = TrainTransform(16)
    ours = sample_crop_boxes(torch.tensor([[h, w]] * n), tf.scale, tf.ratio, torch.Generator().manual_seed(0))
    theirs = np.array([tf.crop_box(w, h, random.Random(i)) for i in range(n)], float)
    for boxes in (ours.numpy(), theirs):
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()

    def stats(b):
        bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        return {"area": bw * bh / (w * h), "log_aspect": np.log(bw / bh),
                "cx": (b[:, 0] + b[:, 2]) / (2 * w), "cy": (b[:, 1] + b[:, 3]) / (2 * h)}

    ours_s, theirs_s = stats(ours.numpy()), stats(theirs)
    for key in ours_s:
        d, crit = _ks(ours_s[key], theirs_s[key])
        assert d < crit, (key, d, crit)
    # The centred fallback box (the largest within the ratio range), by hand.
    bw, bh = w, h
    if w / h < tf.ratio[0]:
        bh = round(w / tf.ratio[0])
    elif w / h > tf.ratio[1]:
        bw = round(h * tf.ratio[1])
    centred = np.array([(w - bw) // 2, (h - bh) // 2, (w - bw) // 2 + bw, (h - bh) // 2 + bh], float)
    rate = [float((b == centred).all(1).mean()) for b in (ours.numpy(), theirs)]
    assert _close(rate[0], rate[1], max(rate[1], 1 / n), n), rate


def test_crop_boxes_draw_from_default_or_given_generator():
    hw = torch.tensor([[30, 40], [64, 64], [5, 90]])
    torch.manual_seed(3)
    a = sample_crop_boxes(hw, (0.08, 1.0), (0.75, 4 / 3))
    torch.manual_seed(3)
    assert torch.equal(a, sample_crop_boxes(hw, (0.08, 1.0), (0.75, 4 / 3)))
    g = torch.Generator().manual_seed(3)
    b = sample_crop_boxes(hw, (0.08, 1.0), (0.75, 4 / 3), g)
    assert not torch.equal(b, sample_crop_boxes(hw, (0.08, 1.0), (0.75, 4 / 3), g))  # the generator advanced
    assert a.dtype == torch.float64 and a.shape == (3, 4)


# ---- crop + resize + flip -----------------------------------------------------------------------


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos", "nearest"])
@pytest.mark.parametrize("mode, size, out", [("RGB", (57, 45), 32), ("L", (30, 40), 24), ("RGB", (48, 40), 64)])
def test_resized_crop_flip_equals_crop_resize(mode, size, out, interpolation):
    """Same box, same pixels as PIL's crop-then-resize (and flip), but RESIZE_TOL of them one level off."""
    img = _image(mode, size)
    tf = TrainTransform(out, in_chans=len(mode), interpolation=interpolation)
    rng = random.Random(0)
    boxes = [tf.crop_box(img.width, img.height, rng) for _ in range(32)] + [(0, 0, *img.size)]
    flips = [i % 2 == 1 for i in range(len(boxes))]
    x = pil_to_uint8(img).expand(len(boxes), -1, -1, -1).contiguous()
    got = resized_crop_flip(x, torch.tensor(boxes, dtype=torch.float64), torch.tensor(flips), out,
                            interpolation=interpolation)
    assert got.shape == (len(boxes), len(mode), out, out) and got.dtype == torch.uint8
    for i, (box, flip) in enumerate(zip(boxes, flips)):
        want = tf.crop_resize(img, box)
        want = want.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else want
        worst, frac = _mismatch(_hwc(got[i]), np.asarray(want))
        assert worst <= 1 and frac <= RESIZE_TOL[interpolation], (i, box, flip, worst, frac)


def test_crop_from_resized_store_follows_the_original_box():
    """Images stored resized: the box maps to stored pixels, close to cropping the original."""
    img = _image("RGB", (57, 45), noise=0)
    stored = pil_to_uint8(img.resize((64, 64), Image.Resampling.BICUBIC))
    tf = TrainTransform(32, scale=(0.25, 1.0))
    rng = random.Random(1)
    boxes = [tf.crop_box(57, 45, rng) for _ in range(16)]
    x = stored.expand(len(boxes), -1, -1, -1).contiguous()
    args = (x, torch.tensor(boxes, dtype=torch.float64), torch.zeros(len(boxes), dtype=torch.bool), 32)
    got = resized_crop_flip(*args, src_scale=torch.tensor([[64 / 45, 64 / 57]] * len(boxes)))
    unscaled = resized_crop_flip(*args)  # the box read as stored pixels: the wrong region
    want = np.stack([np.asarray(tf.crop_resize(img, b)) for b in boxes]).astype(float)
    err = np.abs(got.permute(0, 2, 3, 1).numpy() - want).mean()
    wrong = np.abs(unscaled.permute(0, 2, 3, 1).numpy() - want).mean()
    assert err < 4.0 and err < wrong / 3, (err, wrong)


# ---- RandAugment: each op's pixels against PIL --------------------------------------------------


def _op_cases(name: str):
    cases = [(m, neg, inc) for m in (0, 3, 5.5, 9, 10) for neg in (False, True) for inc in (False, True)]
    args = [op_argument(name, m, neg, inc) for m, neg, inc in cases]
    return cases, args, None if args[0] is None else torch.tensor(args, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("name", OPS)
def test_each_op_equals_pil(name, mode):
    """Every op, at every magnitude, sign and level mapping: PIL's pixels (bicubic geometry within AFFINE_TOL)."""
    img = _image(mode)
    cases, args, arg_t = _op_cases(name)
    fill = FILL if mode == "RGB" else (GRAY_FILL,)
    got = apply_op_batch(pil_to_uint8(img).expand(len(cases), -1, -1, -1).contiguous(), name, arg_t, fill)
    changed = False
    for i, arg in enumerate(args):
        want = np.asarray(apply_op(img, name, arg, fill if mode == "RGB" else GRAY_FILL, Image.Resampling.BICUBIC))
        worst, frac = _mismatch(_hwc(got[i]), want)
        assert (worst <= 1 and frac <= AFFINE_TOL) if name in GEOMETRIC else worst == 0, (name, cases[i], worst, frac)
        changed |= not np.array_equal(want, np.asarray(img))
    assert changed == (not (name == "Color" and mode == "L"))  # Color is the identity on gray


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_ops_equal_pil_with_other_filters(name, interpolation):
    img = _image("RGB", (33, 27))
    cases, args, arg_t = _op_cases(name)
    got = apply_op_batch(pil_to_uint8(img).expand(len(cases), -1, -1, -1).contiguous(), name, arg_t, FILL,
                         interpolation)
    for i, arg in enumerate(args):
        want = np.asarray(apply_op(img, name, arg, FILL, _RESAMPLE[interpolation]))
        worst, frac = _mismatch(_hwc(got[i]), want)
        assert worst == 0, (cases[i], worst, frac)


def _few_levels(kind: str) -> Image.Image:
    rng = np.random.default_rng(2)
    if kind == "constant":
        arr = np.full((17, 30), 77)
    elif kind == "two":
        arr = rng.choice([0, 255], (17, 30))
    elif kind == "sparse":
        arr = rng.choice([3, 50, 51, 200], (17, 30))
    else:  # one pixel at the top level: Equalize's table runs past 255 there, which PIL clips
        arr = rng.integers(0, 255, (17, 30))
        arr[0, 0] = 255
    return Image.fromarray(arr.astype(np.uint8))


@pytest.mark.parametrize("kind", ["constant", "two", "sparse", "overflow"])
@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Contrast"])
def test_histogram_ops_on_few_levels(name, kind):
    gray = _few_levels(kind)
    for img in (gray, Image.merge("RGB", (gray, gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gray))):
        arg = None if name != "Contrast" else torch.tensor([0.3, 1.7], dtype=torch.float64)
        x = pil_to_uint8(img).expand(2, -1, -1, -1).contiguous()
        got = apply_op_batch(x, name, arg, FILL[: len(img.getbands())])
        for i in range(2):
            want = np.asarray(apply_op(img, name, None if arg is None else arg[i].item(), FILL, 3))
            assert _mismatch(_hwc(got[i]), want) == (0, 0.0), (name, kind, img.mode, i)


# ---- RandAugment: the draws -----------------------------------------------------------------


def test_op_argument_same_numbers_for_a_batch():
    mags = torch.tensor([0, 0.3, 2.5, 4.99, 5, 6.25, 7.77, 9, 9.999, 10], dtype=torch.float64)
    for name in OPS:
        for inc in (False, True):
            for negate in (False, True):
                got = op_argument(name, mags, torch.full(mags.shape, negate), inc, 0.3)
                want = [op_argument(name, m, negate, inc, 0.3) for m in mags.tolist()]
                if want[0] is None:
                    assert got is None
                else:
                    assert got.dtype == torch.float64 and got.tolist() == [float(v) for v in want], (name, inc)


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd101-p0.8", "rand-m5-n1-mstd0-p1"])
def test_op_draws_match_worker_path(spec, monkeypatch):
    """Ops per image, each op's frequency, magnitudes and each op's arguments: the PIL path's distribution."""
    n, pil_mags = 9000, []
    draw_magnitude = RandAugment.magnitude

    def recorded(self, rng):
        pil_mags.append(draw_magnitude(self, rng))
        return pil_mags[-1]

    monkeypatch.setattr(RandAugment, "magnitude", recorded)
    plans = [RandAugment(spec).plan(sample_rng(0, 0, i)) for i in range(n)]
    batch = BatchRandAugment(spec)
    d = batch.draw(n, torch.Generator().manual_seed(0))
    assert not (d["negate"] & ~torch.tensor([takes_sign(o, batch.inc) for o in OPS])[d["op"]]).any()
    applied = d["applied"]
    per_image_ours, per_image_pil = Counter(applied.sum(1).tolist()), Counter(len(p) for p in plans)
    for k in range(batch.n + 1):
        p_k = math.comb(batch.n, k) * batch.p**k * (1 - batch.p) ** (batch.n - k)
        assert _close(per_image_ours[k] / n, per_image_pil[k] / n, max(p_k, 1 / n), n), (k, per_image_ours)
        assert _close(per_image_ours[k] / n, p_k, max(p_k, 1 / n), n), k
    mags = d["magnitude"][applied]
    d_mag, crit = _ks(mags.numpy(), pil_mags)
    assert d_mag <= crit, (d_mag, crit)
    trials, p_op = n * batch.n, batch.p / len(OPS)
    pil_args = {name: [arg for p in plans for nm, arg in p if nm == name] for name in OPS}
    for k, name in enumerate(OPS):
        mine = applied & (d["op"] == k)
        assert _close(mine.sum().item() / trials, len(pil_args[name]) / trials, p_op, trials), name
        if pil_args[name][0] is None:
            continue
        ours = op_argument(name, d["magnitude"][mine], d["negate"][mine], batch.inc, batch.translate_pct)
        d_arg, crit = _ks(ours.numpy(), pil_args[name])
        assert d_arg <= crit, (name, d_arg, crit)


def test_rand_augment_batch_equals_pil_ops_in_order():
    """Drawn ops applied to a batch: each image equals PIL applying its own ops in order."""
    imgs = [_image("RGB", (36, 30), seed=i) for i in range(16)]
    ra = BatchRandAugment("rand-m9-n4-mstd0.5-inc1-p0.9")
    d = ra.draw(len(imgs), torch.Generator().manual_seed(3))
    got = ra.apply(_batch(imgs), d)
    seen = set()
    for i, img in enumerate(imgs):
        for step in range(ra.n):
            if d["applied"][i, step]:
                name = OPS[d["op"][i, step]]
                seen.add(name)
                arg = op_argument(name, d["magnitude"][i, step].item(), bool(d["negate"][i, step]), True)
                img = apply_op(img, name, arg, FILL, Image.Resampling.BICUBIC)
        # A bicubic geometric op's one-level differences can grow in the ops after it (Solarize).
        assert _mismatch(_hwc(got[i]), np.asarray(img))[1] <= AFFINE_TOL, i
    assert len(seen) >= 12


def test_rand_augment_gray_and_bad_input():
    gray = _batch([_image("L", seed=i) for i in range(6)])
    out = BatchRandAugment("rand-m9-n3-mstd0.5-inc1-p1", fill=FILL)(gray, torch.Generator().manual_seed(0))
    assert out.shape == gray.shape and out.dtype == torch.uint8 and not torch.equal(out, gray)
    with pytest.raises(DataError, match="uint8"):
        BatchRandAugment("rand-m9")(gray.float())
    with pytest.raises(ConfigError, match="RandAugment spec"):
        BatchRandAugment("rand-q9")


# ---- BatchGeometry ----------------------------------------------------------------------------


def test_batch_geometry_whole_image_is_pil_resize_and_flip():
    img = _image("RGB", (48, 48))
    x = pil_to_uint8(img).expand(4, -1, -1, -1).contiguous()
    hw = torch.tensor([[48, 48]] * 4)
    want = img.resize((32, 32), Image.Resampling.BICUBIC)
    for hflip, ref in ((0.0, want), (1.0, want.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
        out = BatchGeometry(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=hflip)(x, hw)
        for o in out:
            worst, frac = _mismatch(_hwc(o), np.asarray(ref))
            assert worst <= 1 and frac <= RESIZE_TOL["bicubic"]


def test_batch_geometry_per_sample_and_seeded():
    x = _batch([_image("RGB", (40, 40), seed=i) for i in range(8)])
    hw = torch.tensor([[40, 40], [80, 60], [30, 90], [40, 40]] * 2)
    geo = BatchGeometry(24, auto_augment="rand-m9-mstd0.5-inc1")
    torch.manual_seed(0)
    a = geo(x, hw)
    torch.manual_seed(0)
    assert torch.equal(a, geo(x, hw))
    assert a.shape == (8, 3, 24, 24) and a.dtype == torch.uint8
    assert not torch.equal(a, geo(x, hw))
    same_input = BatchGeometry(24)(x[:1].expand(8, -1, -1, -1), hw)
    assert len({o.numpy().tobytes() for o in same_input}) == 8  # each image its own crop
    gray = BatchGeometry((16, 20), auto_augment="rand-m9-n3-p1")(x[:, :1], None)
    assert gray.shape == (8, 1, 16, 20)


@pytest.mark.parametrize("kwargs, match", [
    ({"scale": (0.5, 0.2)}, "scale"), ({"ratio": (0, 1)}, "ratio"), ({"hflip": 1.5}, "hflip"),
    ({"interpolation": "area"}, "interpolation"), ({"auto_augment": "rand-m9-w0"}, "weighted"),
])
def test_batch_geometry_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BatchGeometry(32, **kwargs)
