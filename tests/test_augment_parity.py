"""DeiT augmentation semantics: RandAugment and random erasing against timm, determinism, views."""

from __future__ import annotations

import inspect
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import assert_same_run, crash_and_resume, lazy_peer, require_peer
from PIL import Image

from vitkit._peers import import_peer
from vitkit.data import (
    BatchAugment,
    Normalize,
    RandAugment,
    ShapesDataset,
    TrainTransform,
    build_loader,
    random_erase,
    sample_rng,
)
from vitkit.data.rand_augment import OPS, apply_op, op_argument

aa = lazy_peer("timm.data.auto_augment")
timm_erasing = lazy_peer("timm.data.random_erasing")
timm_transforms = lazy_peer("timm.data.transforms")

SPEC = "rand-m9-mstd0.5-inc1"
FILL = (124, 116, 104)  # round(255 * ImageNet mean), what DeiT's pipeline fills geometric ops with
# The hparams timm's create_transform builds for a 224 px bicubic DeiT run with the ImageNet mean.
HPARAMS = dict(translate_const=int(224 * 0.45), img_mean=FILL, interpolation=Image.Resampling.BICUBIC)


def _vitkit_name(timm_name: str) -> str:
    return timm_name.replace("Increasing", "").replace("Rel", "")


def _test_image(mode: str = "RGB", size=(40, 36)) -> Image.Image:
    """Structured content (gradients, a bright square, noise) so every op changes something."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    chans = [(xx * 5 + yy * 2) % 256, (yy * 7) % 256, (xx * yy) % 256]
    arr = np.stack(chans, -1).astype(np.float64) * 0.7 + rng.integers(0, 60, (h, w, 3))
    arr[8:20, 10:24] = 250
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    return img.convert("L") if mode == "L" else img


# ---- RandAugment: the op set, each op's effect ----------------------------------------------


def test_op_set_matches_timm_inc1():
    ra = aa.rand_augment_transform(SPEC, dict(HPARAMS))
    assert sorted(_vitkit_name(op.name) for op in ra.ops) == sorted(OPS) and len(OPS) == 15
    assert ra.num_layers == RandAugment(SPEC).n == 2
    assert all(op.prob == 0.5 and op.magnitude_std == 0.5 for op in ra.ops)


def _op_cases() -> list:
    """timm's op names; without timm, one case that the peer mark fails (in CI) or skips."""
    try:
        ops = import_peer("timm.data.auto_augment")
    except ImportError:
        ops = None
    if ops is None:
        return [("timm-not-importable", False)]
    return [(name, True) for name in ops._RAND_INCREASING_TRANSFORMS] + [
        (name, False) for name in ops._RAND_TRANSFORMS if name not in ops._RAND_INCREASING_TRANSFORMS
    ]


_OP_CASES = _op_cases()


@pytest.mark.peer("timm.data.auto_augment")
@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("timm_name, increasing", _OP_CASES)
def test_each_op_equals_timm(monkeypatch, timm_name, increasing, mode):
    """Pixel-exact for every op (inc1, and the inc0 level mappings), magnitude and sign."""
    ops = require_peer("timm.data.auto_augment")
    name = _vitkit_name(timm_name)
    img = _test_image(mode)
    fill = FILL if mode == "RGB" else round(sum(FILL) / 3)
    hparams = {**HPARAMS, "img_mean": fill}  # timm needs a single fill value for "L" images
    changed = False
    for magnitude in (0, 3, 5.5, 9, 10):
        for negate in (False, True):
            monkeypatch.setattr(ops, "_randomly_negate", (lambda v: -v) if negate else (lambda v: v))
            arg = op_argument(name, magnitude, negate, increasing=increasing)
            got = apply_op(img, name, arg, fill, Image.Resampling.BICUBIC)
            if name == "Posterize" and arg == 0:
                # Keep 0 bits: black. (timm passes bits=0 to ImageOps.posterize, which Pillow >= 11 rejects.)
                assert not np.asarray(got).any()
                continue
            expected = aa.AugmentOp(timm_name, prob=1.0, magnitude=magnitude, hparams=hparams)(img)
            assert got.mode == img.mode and got.size == img.size
            assert np.array_equal(np.asarray(got), np.asarray(expected)), (name, magnitude, negate)
            changed |= not np.array_equal(np.asarray(got), np.asarray(img))
    # An op that never changes the image would make the comparison vacuous (gray has no colour).
    assert changed == (not (name == "Color" and mode == "L"))


def test_enhance_ops_go_both_ways_and_brightness_multiplies():
    img = _test_image()
    base = np.asarray(img, np.float64)
    brighter = np.asarray(apply_op(img, "Brightness", op_argument("Brightness", 9, False, True), FILL, 0), np.float64)
    darker = np.asarray(apply_op(img, "Brightness", op_argument("Brightness", 9, True, True), FILL, 0), np.float64)
    assert op_argument("Brightness", 9, False, True) == pytest.approx(1.81)
    assert op_argument("Brightness", 9, True, True) == pytest.approx(0.19)
    assert op_argument("Contrast", 10, True, True) == pytest.approx(0.1)  # kept >= 0.1
    # Multiplicative: a dark pixel moves less than a bright one.
    dark = base < 60
    assert np.abs(darker - base)[dark].mean() < np.abs(darker - base)[~dark].mean()
    assert (darker <= base + 0.5).all() and (brighter >= base - 0.5).all()
    assert op_argument("Posterize", 9, False, True) == 1 and op_argument("Solarize", 9, False, True) == 26


def test_grayscale_and_rgb_pipelines():
    ra = RandAugment("rand-m9-n15-mstd0.5-inc1-p1")
    seeds = range(6)
    assert {name for seed in seeds for name, _ in ra.plan(random.Random(seed))} == set(OPS)  # all ops drawn
    for mode in ("RGB", "L"):
        img = _test_image(mode)
        tf = TrainTransform(24, in_chans=len(mode), interpolation="lanczos", auto_augment="rand-m9-n15-mstd0.5-inc1-p1")
        for seed in seeds:
            out = ra(img, random.Random(seed))
            assert out.mode == mode and out.size == img.size
            assert tf(img, random.Random(seed)).shape == (len(mode), 24, 24)


# ---- random-resized crop -----------------------------------------------------------------------


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size, image", [(32, (57, 45)), (24, (30, 40)), (64, (48, 40))])
def test_random_resized_crop_equals_timm(size, image, interpolation):
    """Same box from a generator in the same state, and the same pixels: the crop is cut out and then
    resized, so its border pixels are not blended with the image around it."""
    img = _test_image(size=image)
    tf = TrainTransform(size, hflip=0.0, interpolation=interpolation)
    theirs = timm_transforms.RandomResizedCropAndInterpolation(size, interpolation=interpolation)
    for seed in range(12):
        random.seed(seed)
        want = np.asarray(theirs(img)).transpose(2, 0, 1)
        got = tf(img, random.Random(seed)).numpy()
        assert np.array_equal(got, want), (seed, np.abs(got.astype(int) - want).max(), (got != want).mean())


@pytest.mark.parametrize("scale, image", [((0.08, 1.0), (40, 36)), ((0.9, 1.0), (120, 20)), ((0.9, 1.0), (20, 120))])
def test_crop_box_draws_as_timm(scale, image):
    """The same draws in the same order as timm's get_params (the fallback too: extreme aspect ratios)."""
    img = _test_image(size=image)
    tf = TrainTransform(16, scale=scale)
    for seed in range(40):
        random.seed(seed)
        i, j, h, w = timm_transforms.RandomResizedCropAndInterpolation.get_params(img, scale, (3 / 4, 4 / 3))
        assert tf.crop_box(*image, random.Random(seed)) == (j, i, j + w, i + h), seed


# ---- RandAugment: op frequencies and magnitudes over many images -----------------------------


def _timm_draws(spec: str, n_images: int):
    """Run timm's RandAugment on a 1-pixel image, recording applied op names and magnitudes."""
    ra = aa.rand_augment_transform(spec, dict(HPARAMS))
    names, mags, per_image = Counter(), [], []
    count = [0]

    def recorder(name, level_fn):
        def level(m, hp):
            names[name] += 1
            mags.append(m)
            count[0] += 1
            return level_fn(m, hp) if level_fn is not None else ()

        return level

    for op in ra.ops:
        op.level_fn = recorder(_vitkit_name(op.name), op.level_fn)
        op.aug_fn = lambda img, *a, **k: img
    random.seed(0)
    np.random.seed(0)
    img = Image.new("RGB", (1, 1))
    for _ in range(n_images):
        count[0] = 0
        ra(img)
        per_image.append(count[0])
    return names, np.array(mags), Counter(per_image)


class _RecordingRA(RandAugment):
    def __init__(self, spec):
        super().__init__(spec)
        self.mags = []

    def magnitude(self, rng):
        m = super().magnitude(rng)
        self.mags.append(m)
        return m


def _vitkit_draws(spec: str, n_images: int):
    ra = _RecordingRA(spec)
    names, per_image, signs = Counter(), Counter(), Counter()
    for i in range(n_images):
        plan = ra.plan(sample_rng(0, 0, i))
        per_image[len(plan)] += 1
        for name, arg in plan:
            names[name] += 1
            if name in ("Rotate", "ShearX", "Brightness"):
                signs[name, (arg < 0) if name != "Brightness" else (arg < 1)] += 1
    return names, np.array(ra.mags), per_image, signs


def _close(a: float, b: float, p: float, n: int, z: float = 5.0) -> bool:
    """Two binomial proportions from n draws each agree within z combined standard deviations."""
    return abs(a - b) <= z * math.sqrt(2 * p * (1 - p) / n)


def test_op_frequencies_and_magnitudes_match_timm():
    n = 12000
    t_names, t_mags, t_count = _timm_draws(SPEC, n)
    v_names, v_mags, v_count, signs = _vitkit_draws(SPEC, n)
    # Ops per image: 2 picks, each applied with p=0.5 -> 0, 1, 2 ops with 1/4, 1/2, 1/4.
    for k, p in ((0, 0.25), (1, 0.5), (2, 0.25)):
        assert _close(v_count[k] / n, p, p, n) and _close(t_count[k] / n, p, p, n), (k, v_count, t_count)
    # Each op is applied in 2 * 0.5 / 15 of the images, in timm and in vitkit.
    p_op = 1 / 15
    for name in OPS:
        assert _close(v_names[name] / n, t_names[name] / n, p_op, n), (name, v_names[name], t_names[name])
        assert _close(v_names[name] / n, p_op, p_op, n), name
    # Magnitudes: N(9, 0.5) clipped to [0, 10]; 2.28% land exactly on 10.
    for mags in (v_mags, t_mags):
        assert mags.min() >= 0 and mags.max() == 10.0
        assert _close((mags == 10).mean(), 0.02275, 0.02275, len(mags), z=5)
        inside = mags[mags < 10]
        assert inside.mean() == pytest.approx(8.97, abs=0.03) and inside.std() == pytest.approx(0.48, abs=0.03)
    assert v_mags.mean() == pytest.approx(t_mags.mean(), abs=0.03)
    assert v_mags.std() == pytest.approx(t_mags.std(), abs=0.03)
    # Signed ops and the increasing enhance ops go either way with probability 1/2.
    for name in ("Rotate", "ShearX", "Brightness"):
        total = signs[name, True] + signs[name, False]
        assert _close(signs[name, True] / total, 0.5, 0.5, total), (name, signs)


def test_uniform_magnitude_when_mstd_over_100():
    n = 6000
    _, t_mags, _ = _timm_draws("rand-m9-mstd101", n)
    _, v_mags, _, _ = _vitkit_draws("rand-m9-mstd101", n)
    for mags in (v_mags, t_mags):
        assert mags.min() >= 0 and mags.max() <= 9
        assert mags.mean() == pytest.approx(4.5, abs=0.15) and mags.std() == pytest.approx(9 / math.sqrt(12), abs=0.1)


def test_magnitude_clipped_at_zero():
    mags = np.array([_RecordingRA("rand-m0-mstd1").magnitude(random.Random(i)) for i in range(2000)])
    assert mags.min() == 0.0 and _close((mags == 0).mean(), 0.5, 0.5, 2000)


# ---- determinism ----------------------------------------------------------------------------


def test_rand_augment_deterministic_per_sample():
    img = _test_image(size=(48, 40))
    tf = TrainTransform(32, auto_augment=SPEC)
    a = tf(img, sample_rng(3, 1, 7))
    assert torch.equal(a, tf(img, sample_rng(3, 1, 7)))
    others = [tf(img, sample_rng(3, 1, i)) for i in range(8, 14)] + [tf(img, sample_rng(3, 2, 7))]
    assert all(not torch.equal(a, o) for o in others)


def test_loader_with_rand_augment_same_in_any_worker():
    ds = ShapesDataset(n=24, img_size=40)

    def batches(workers):
        loader = build_loader(ds, 8, train=True, transform=TrainTransform(32, auto_augment=SPEC),
                              num_workers=workers, seed=5)
        loader.set_epoch(2)
        return list(loader)

    a, b = batches(0), batches(2)
    assert len(a) == 3
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["index"], y["index"])
    plain = build_loader(ds, 8, train=True, transform=TrainTransform(32), seed=5)
    plain.set_epoch(2)
    assert not torch.equal(next(iter(plain))["image"], a[0]["image"])  # RandAugment changed something


# ---- random erasing ---------------------------------------------------------------------------


def _erased(x: torch.Tensor, value: float) -> torch.Tensor:
    """(B, C, H, W) input filled with ``value`` -> bool (B, H, W) of the pixels erasing changed."""
    return (x != value).any(1)


def _timm_erase(b, h, w, prob):
    random.seed(0)
    x = torch.ones(b, 3, h, w)
    return _erased(timm_erasing.RandomErasing(prob, mode="const", device="cpu")(x), 1.0)


def test_erasing_defaults_are_timms():
    """Random Erasing's area (2% to 1/3) and aspect ratio (0.3 to 1/0.3, log-uniform) as timm's."""
    theirs = timm_erasing.RandomErasing(0.25, mode="pixel", device="cpu")
    defaults = inspect.signature(random_erase).parameters
    assert defaults["area"].default == (theirs.min_area, theirs.max_area)
    lo, hi = defaults["ratio"].default
    assert (math.log(lo), math.log(hi)) == pytest.approx(theirs.log_aspect_ratio, abs=1e-12)


def test_erasing_boxes_match_timm_distribution():
    b, h, w = 3000, 40, 32
    ours = _erased(random_erase(torch.ones(b, 3, h, w), prob=1.0, mode="const"), 1.0)
    theirs = _timm_erase(b, h, w, 1.0)
    for masks in (ours, theirs):
        hit = masks.flatten(1).any(1)
        area = masks.flatten(1).float().mean(1)[hit]
        rows, cols = masks.any(2).sum(1)[hit].float(), masks.any(1).sum(1)[hit].float()
        assert hit.float().mean() > 0.99  # 10 attempts nearly always find a box that fits
        assert ((rows * cols) / (h * w) == area).all()  # one solid rectangle per image
        assert (rows < h).all() and (cols < w).all()
        assert area.min() >= 0.015 and area.max() <= 1 / 3 + 0.02
        aspect = rows / cols
        assert aspect.min() >= 0.3 * 0.8 and aspect.max() <= 3.3 * 1.25
    def stats(masks):
        hit = masks.flatten(1).any(1)
        area = masks.flatten(1).float().mean(1)[hit]
        log_aspect = (masks.any(2).sum(1).float() / masks.any(1).sum(1).float())[hit].log()
        return area.mean().item(), area.std().item(), log_aspect.mean().item(), log_aspect.std().item()

    (a_mean, a_std, r_mean, r_std), (ta_mean, ta_std, tr_mean, tr_std) = stats(ours), stats(theirs)
    assert a_mean == pytest.approx(ta_mean, abs=0.008) and a_std == pytest.approx(ta_std, abs=0.008)
    assert r_mean == pytest.approx(tr_mean, abs=0.06) and r_std == pytest.approx(tr_std, abs=0.04)


def test_erasing_probability_and_independence():
    b = 8000
    hit = _erased(random_erase(torch.ones(b, 3, 16, 16), prob=0.25, mode="const"), 1.0).flatten(1).any(1).float()
    assert _close(hit.mean().item(), 0.25, 0.25, b)
    # Whether neighbours are erased is uncorrelated, and the erased boxes all differ in place or size.
    assert abs(np.corrcoef(hit[:-1].numpy(), hit[1:].numpy())[0, 1]) < 0.05
    masks = _erased(random_erase(torch.ones(64, 1, 32, 32), prob=1.0, mode="const"), 1.0)
    assert len({m.numpy().tobytes() for m in masks}) > 55


def test_erasing_fill_modes():
    x = torch.full((400, 3, 24, 24), 7.0)
    pixel = random_erase(x, prob=1.0, mode="pixel")
    noise = pixel[pixel != 7.0]
    assert noise.numel() > 400 * 3 * 24 * 24 * 0.02
    assert noise.mean().abs() < 0.02 and noise.std() == pytest.approx(1.0, abs=0.02)
    assert torch.equal(x, torch.full_like(x, 7.0))  # the input is not modified in place
    const = random_erase(x, prob=1.0, mode="const")
    assert set(const.unique().tolist()) == {0.0, 7.0}
    with pytest.raises(ValueError, match="pixel"):
        random_erase(x, mode="rand")
    with pytest.raises(ValueError, match="re_mode"):
        BatchAugment(re_mode="zero")


# ---- BatchAugment: views and the raw image ------------------------------------------------


def test_views_get_independent_draws_and_raw_images():
    torch.manual_seed(1)
    big = torch.full((16, 3, 32, 32), 200, dtype=torch.uint8)
    small = torch.full((16, 3, 16, 16), 200, dtype=torch.uint8)
    aug = BatchAugment(re_prob=1.0, re_mode="const", keep_raw=True)
    out = aug({"views": [big, big.clone(), small], "label": torch.zeros(16)})
    assert [v.shape[-1] for v in out["views"]] == [32, 32, 16] and "image" not in out
    plain = Normalize()(big.float() / 255)
    masks = [(v != plain[:, :, : v.shape[2], : v.shape[3]]).any(1) for v in out["views"]]
    # The same pixels in two views get different boxes, sample by sample.
    assert sum(not torch.equal(masks[0][i], masks[1][i]) for i in range(16)) >= 15
    big_frac = masks[0].flatten(1).float().mean(1)
    small_frac = masks[2].flatten(1).float().mean(1)
    assert not torch.allclose(big_frac, small_frac, atol=0.01)
    for raw in out["views_raw"]:
        assert torch.allclose(raw, torch.full_like(raw, 200 / 255))


def test_image_raw_is_unnormalised_image_where_not_erased():
    x = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    aug = BatchAugment(mean, std, color_jitter=0.4, re_prob=0.5, keep_raw=True)
    out = aug({"image": x, "label": torch.zeros(8)})
    raw = out["image_raw"]
    assert raw.min() >= 0 and raw.max() <= 1 and raw.shape == x.shape
    assert not torch.allclose(raw, x.float() / 255)  # colour jitter ran (before the raw copy)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    same = torch.isclose(out["image"] * s + m, raw, atol=1e-5)
    assert same.float().mean() > 0.8 and not same.all()  # differs exactly where erased
    erased = ~same.all(1)
    rows, cols = erased.any(2).sum(1), erased.any(1).sum(1)
    assert torch.equal(erased.flatten(1).sum(1), rows * cols)  # the differences form the erased boxes


def test_eval_normalize_on_views():
    views = [torch.full((2, 3, 8, 8), 255, dtype=torch.uint8), torch.zeros(2, 3, 4, 4, dtype=torch.uint8)]
    out = Normalize((0.5,), (0.5,))({"views": views, "label": torch.zeros(2)})
    assert torch.allclose(out["views"][0], torch.ones(2, 3, 8, 8)) and torch.allclose(out["views"][1], -torch.ones(2, 3, 4, 4))


def test_color_jitter_per_sample():
    x = torch.full((32, 3, 4, 4), 128, dtype=torch.uint8)
    out = BatchAugment((0.0,), (1.0,), color_jitter=0.4, re_prob=0.0)(x)
    per_sample = out.mean((1, 2, 3))
    assert len(set(per_sample.tolist())) == 32
    assert per_sample.min() >= 128 / 255 * 0.6 - 1e-6 and per_sample.max() <= 128 / 255 * 1.4 + 1e-6


# ---- end to end: the DeiT augmentation resumes bitwise ----------------------------------------


def test_training_with_deit_augmentation_resumes_bitwise(tmp_path):
    """RandAugment in 2 workers, pixel erasing and Mixup/CutMix: a run interrupted mid-epoch and
    resumed ends with exactly the weights of an uninterrupted run."""
    from vitkit.config import load_config
    from vitkit.train import build_run

    def trainer(out, hooks=()):
        cfg = load_config(overrides=[
            "model.name=test_vit", "data.path=shapes:96", "data.img_size=32", "data.batch_size=16",
            "data.num_workers=2", "engine.epochs=2", "engine.ckpt_every_steps=4", "engine.amp=none",
            "engine.tensorboard=false", "engine.plots=false", f"engine.out_dir={out}",
            "data.auto_augment=rand-m9-mstd0.5-inc1", "data.re_prob=0.5", "data.re_mode=pixel",
        ])
        torch.manual_seed(cfg.engine.seed)
        tr, _ = build_run(cfg, verbose=False)
        tr.hooks = list(hooks)
        return tr

    full = trainer(tmp_path / "full")
    full.fit()
    # 6 steps per epoch: the checkpoint at step 8 is mid-epoch 2.
    resumed = crash_and_resume(trainer, tmp_path / "run", 10, latest=8)
    assert full.step == 12
    assert_same_run(full, resumed, optimizer=False)
