"""Shapes, transforms, batch augmentation, mixup, samplers and loader reproducibility."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.config import load_config
from vitkit.data import (
    BatchAugment,
    EvalTransform,
    Mixup,
    Normalize,
    RepeatAugSampler,
    ResumableSampler,
    ShapesDataset,
    TrainTransform,
    build_loader,
    cutmix_box,
    parse_rand_augment,
    smooth_one_hot,
)
from vitkit.errors import ConfigError

# ---- shapes -------------------------------------------------------------------------------------


def test_shapes_deterministic_and_disjoint():
    a, b = ShapesDataset(n=12, seed=1), ShapesDataset(n=12, seed=1)
    for i in (0, 7):
        assert np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0]))
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(a[6][0]))  # same class, other index
    val = ShapesDataset(n=12, split="val", seed=1)
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(val[0][0]))
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(ShapesDataset(n=12, seed=2)[0][0]))


def test_shapes_sample_and_balance():
    ds = ShapesDataset(n=60, img_size=48)
    assert np.bincount(ds.targets).tolist() == [10] * 6 and ds.classes[3] == "star"
    s = ds.sample(9)
    img, label = ds[9]
    assert np.array_equal(np.asarray(s["image"]), np.asarray(img)) and s["label"] == label == 3
    x0, y0, x1, y1 = s["box"]
    assert s["mask"].shape == (48, 48) and s["mask"].any()
    assert s["mask"][:, :x0].sum() == 0 and s["mask"][y1:].sum() == 0
    assert 0.42 * 48 * 0.5 < max(x1 - x0, y1 - y0) <= 48  # a large shape
    assert "star" in s["caption"] and s["caption"].startswith("a ")
    assert ds[0][0].size == (48, 48) and ShapesDataset(n=2, in_chans=1)[0][0].mode == "L"
    with pytest.raises(ValueError, match="classes"):
        ShapesDataset(classes=("circle", "blob"))
    extra = ShapesDataset(n=4, classes=("pentagon", "ring", "arrow", "crescent"))
    assert all(extra.sample(i)["mask"].any() for i in range(4))


def test_shapes_colour_carries_no_label():
    ds = ShapesDataset(n=600, img_size=32)
    # Mean colour of the shape's pixels, per class: no class stands out in any channel.
    means = np.zeros((6, 3))
    for i in range(len(ds)):
        s = ds.sample(i)
        means[s["label"]] += np.asarray(s["image"], np.float64)[s["mask"]].mean(0) / 100
    assert np.ptp(means, axis=0).max() < 40, means


# ---- transforms ---------------------------------------------------------------------------------


def test_train_eval_transform_shapes_dtypes():
    img = Image.new("RGB", (50, 30), (10, 20, 30))
    t = TrainTransform(24)(img, random.Random(0))
    assert t.shape == (3, 24, 24) and t.dtype == torch.uint8 and t[:, 0, 0].tolist() == [10, 20, 30]
    assert TrainTransform((16, 20), in_chans=1)(img).shape == (1, 16, 20)
    e = EvalTransform(24, crop_pct=0.875)(img)
    assert e.shape == (3, 24, 24) and e.dtype == torch.uint8
    a = TrainTransform(24)(Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), np.uint8)), random.Random(5))
    b = TrainTransform(24)(Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), np.uint8)), random.Random(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="crop_pct"):
        EvalTransform(24, crop_pct=0)


def test_eval_centre_crop_values():
    arr = np.zeros((40, 40), np.uint8)
    arr[10:30, 10:30] = 255
    out = EvalTransform(20, in_chans=1, crop_pct=0.5, interpolation="nearest")(Image.fromarray(arr))
    assert out.shape == (1, 20, 20) and int(out.min()) == 255


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("rand-m9-mstd0.5-inc1", {"m": 9.0, "n": 2, "mstd": 0.5, "inc": True, "p": 0.5, "mmax": 10.0}),
        ("rand-n3-m7", {"m": 7.0, "n": 3, "mstd": 0.0, "inc": False, "p": 0.5, "mmax": 10.0}),
        ("rand", {"m": 9.0, "n": 2, "mstd": 0.0, "inc": False, "p": 0.5, "mmax": 10.0}),
        ("rand-m12-mmax15-p1-mstd101", {"m": 12.0, "n": 2, "mstd": float("inf"), "inc": False, "p": 1.0, "mmax": 15.0}),
    ],
)
def test_parse_rand_augment(spec, expected):
    assert parse_rand_augment(spec) == expected


@pytest.mark.parametrize("spec", ["rand-m", "randaug-m9", "rand-m9-x2", "rand-m11", "rand-n0", "", "rand-w0", "rand-p2"])
def test_parse_rand_augment_rejects(spec):
    with pytest.raises(ConfigError, match="RandAugment"):
        parse_rand_augment(spec)
    with pytest.raises(ConfigError, match="RandAugment"):
        load_config(overrides=[f"data.auto_augment={spec or 'rand-'}"])


def test_re_mode_config():
    assert load_config().data.re_mode == "pixel"
    with pytest.raises(ConfigError, match="re_mode"):
        load_config(overrides=["data.re_mode=zeros"])


@pytest.mark.parametrize("chans", [1, 3])
def test_batch_augment_and_normalize(chans):
    x = torch.randint(0, 256, (4, chans, 16, 16), dtype=torch.uint8)
    out = BatchAugment(color_jitter=0.3, re_prob=0.5)({"image": x, "label": torch.zeros(4)})
    assert out["image"].shape == x.shape and out["image"].dtype == torch.float32 and out["image"].isfinite().all()
    n = Normalize((0.5,), (0.5,))(torch.full((1, chans, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(n, torch.ones_like(n))
    plain = BatchAugment(re_prob=0.0)(x)
    assert torch.allclose(plain, Normalize()(x))
    out = Normalize()({"image": x, "label": torch.zeros(4)})
    assert set(out) == {"image", "label"} and torch.allclose(out["image"], plain)


# ---- mixup --------------------------------------------------------------------------------------


def test_smooth_one_hot_values():
    t = smooth_one_hot(torch.tensor([2, 0]), 4, 0.1)
    assert torch.allclose(t[0], torch.tensor([0.025, 0.025, 0.925, 0.025]))
    assert torch.allclose(t.sum(1), torch.ones(2))


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_targets_sum_to_one(mixup_alpha, cutmix_alpha):
    mix = Mixup(mixup_alpha, cutmix_alpha, label_smoothing=0.1, num_classes=5)
    batch = {"image": torch.rand(6, 3, 8, 8), "label": torch.tensor([0, 1, 2, 3, 4, 0])}
    for _ in range(5):
        out = mix(batch)
        assert out["target"].shape == (6, 5) and torch.allclose(out["target"].sum(1), torch.ones(6))
        assert out["image"].shape == batch["image"].shape
    with pytest.raises(TypeError, match="float"):
        mix({"image": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "label": torch.tensor([0, 1])})


def test_cutmix_area_correction(monkeypatch):
    mix = Mixup(0.0, 1.0, label_smoothing=0.0, num_classes=2)
    monkeypatch.setattr(mix, "sample", lambda: (0.3, True))
    monkeypatch.setattr("vitkit.data.mix.cutmix_box", lambda lam, h, w: (0, 4, 6, 10))  # 4x4 box at the edge
    x = torch.stack([torch.zeros(1, 10, 10), torch.ones(1, 10, 10)])
    out = mix({"image": x, "label": torch.tensor([0, 1])})
    pasted = 16 / 100
    assert torch.allclose(out["target"][0], torch.tensor([1 - pasted, pasted]))
    assert out["image"][0].sum() == 16
    y0, y1, x0, x1 = cutmix_box(0.75, 10, 10)
    assert 0 <= y0 <= y1 <= 10 and 0 <= x0 <= x1 <= 10 and (y1 - y0) <= 5


def test_mixup_disabled_gives_smoothed_targets():
    out = Mixup(0.8, 1.0, prob=0.0, label_smoothing=0.2, num_classes=4)(
        {"image": torch.rand(2, 3, 4, 4), "label": torch.tensor([1, 3])}
    )
    assert torch.allclose(out["target"], smooth_one_hot(torch.tensor([1, 3]), 4, 0.2))


# ---- samplers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ResumableSampler, RepeatAugSampler])
def test_sampler_resume_mid_epoch(cls):
    s = cls(50, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.advance(16)
    state = s.state_dict()
    resumed = cls(50, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert list(resumed) == full[16:]
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(resumed) == 50 and list(resumed) != full
    with pytest.raises(ValueError, match="seed"):
        cls(50, seed=4).load_state_dict(state)


def test_sampler_distributed_partition():
    parts = [list(ResumableSampler(11, seed=0, num_replicas=2, rank=r)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 6
    assert set(parts[0]) | set(parts[1]) == set(range(11))
    dropped = [list(ResumableSampler(11, seed=0, num_replicas=2, rank=r, drop_last=True)) for r in range(2)]
    assert not set(dropped[0]) & set(dropped[1]) and len(dropped[0]) == 5
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(10, num_replicas=2, rank=2)


def test_repeat_aug_sampler():
    parts = [list(RepeatAugSampler(12, num_repeats=3, num_replicas=3, rank=r)) for r in range(3)]
    assert all(len(p) == 4 for p in parts)
    # Repeats of an image go to different ranks, in the same step.
    assert parts[0] == parts[1] == parts[2]
    single = list(RepeatAugSampler(12, num_repeats=3))
    assert len(single) == 12 and single[0] == single[1] == single[2]


# ---- loader -------------------------------------------------------------------------------------


def _loader(ds, workers=0, seed=0):
    return build_loader(ds, 8, train=True, transform=TrainTransform(32), num_workers=workers, seed=seed)


def test_loader_batches_and_reproducibility():
    ds = ShapesDataset(n=40, img_size=40)
    a = list(_loader(ds))
    b = list(_loader(ds, workers=2))
    assert len(a) == 5 and a[0]["image"].shape == (8, 3, 32, 32) and a[0]["image"].dtype == torch.uint8
    assert set(a[0]) == {"image", "label", "index", "skipped"}
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    other = _loader(ds)
    other.set_epoch(1)
    assert not torch.equal(next(iter(other))["index"], a[0]["index"])
    assert not torch.equal(next(iter(_loader(ds, seed=1)))["image"], a[0]["image"])


def test_loader_bitwise_resume():
    ds = ShapesDataset(n=48, img_size=36)
    ref = _loader(ds)
    ref.set_epoch(1)
    full = list(ref)
    first = _loader(ds, workers=2)
    first.set_epoch(1)
    for k, _ in enumerate(first):
        if k == 1:
            break
    first.sampler.advance(2 * 8)
    state = first.sampler.state_dict()
    resumed = _loader(ds)
    resumed.sampler.load_state_dict(state)
    resumed.set_epoch(1)
    rest = list(resumed)
    assert len(rest) == len(full) - 2
    for x, y in zip(rest, full[2:]):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["index"], y["index"])
