"""Multi-crop views and their per-view, per-sample photometric augmentation."""

from __future__ import annotations

import random

import torch
from PIL import Image

from vitkit.data import collate
from vitkit.data.views import MultiCrop, ViewAugment, ViewStyle, adjust_hue, augment_view, gaussian_blur

NO_OPS = dict(jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0, solarize_prob=0.0)


def test_multicrop_gives_global_and_local_views_that_collate_into_views():
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    crops = MultiCrop(32, 16, n_global=2, n_local=3)
    views = crops(img, random.Random(0))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(v.dtype == torch.uint8 for v in views)
    batch = collate([{"image": views, "label": 1, "index": 0, "bad_files": []}] * 4)
    assert "image" not in batch and len(batch["views"]) == 5 and batch["views"][2].shape == (4, 3, 16, 16)
    # The same sample seed repeats the crops; another draws others.
    rnd = torch.randint(0, 255, (30, 40, 3), dtype=torch.uint8).numpy()
    noisy = Image.fromarray(rnd)
    a, b = crops(noisy, random.Random(1)), crops(noisy, random.Random(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # the two global crops are drawn independently


def test_view_styles_apply_per_view_and_per_sample():
    x = torch.rand(1, 3, 16, 16).expand(64, -1, -1, -1).contiguous()  # 64 copies of one image
    solar = augment_view(x, ViewStyle(**{**NO_OPS, "solarize_prob": 0.5}))
    changed = (solar - x).abs().flatten(1).amax(1) > 0
    assert 10 < int(changed.sum()) < 54  # about half the samples, each drawn on its own
    torch.testing.assert_close(solar[changed], torch.where(x < 0.5, x, 1 - x)[changed])
    gray = augment_view(x, ViewStyle(**{**NO_OPS, "gray_prob": 1.0}))
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    jit = augment_view(x, ViewStyle(**{**NO_OPS, "jitter_prob": 1.0}))
    assert jit.min() >= 0 and jit.max() <= 1 and len({round(float(v), 5) for v in jit.mean((1, 2, 3))}) > 50

    aug = ViewAugment([ViewStyle(**NO_OPS), ViewStyle(**{**NO_OPS, "solarize_prob": 1.0})], mean=(0.5,), std=(0.5,))
    u8 = (x[:4] * 255).round().to(torch.uint8)
    out = aug({"views": [u8, u8, u8]})
    plain = u8.float() / 255 * 2 - 1
    torch.testing.assert_close(out["views"][0], plain)  # view 0: only normalised
    assert not torch.allclose(out["views"][1], plain)  # view 1: solarized
    torch.testing.assert_close(out["views"][2], out["views"][1])  # later views reuse the last style


def test_blur_and_hue_hand_cases():
    const = torch.full((2, 3, 9, 9), 0.3)
    torch.testing.assert_close(gaussian_blur(const, torch.tensor([0.5, 2.0])), const)  # constant stays
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1.0
    blurred = gaussian_blur(impulse, torch.tensor([1.0]))
    assert abs(blurred.sum().item() - 1) < 1e-5  # mass is kept
    assert blurred[0, 0, 4, 4] < 1 and blurred[0, 0, 4, 5] == blurred[0, 0, 5, 4] > 0
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(adjust_hue(x, torch.zeros(2)), x, atol=1e-5, rtol=0)
    g = torch.full((1, 3, 2, 2), 0.4)
    torch.testing.assert_close(adjust_hue(g, torch.tensor([0.3])), g, atol=1e-5, rtol=0)  # gray has no hue
    red = torch.zeros(1, 3, 1, 1)
    red[0, 0] = 0.8
    assert adjust_hue(red, torch.tensor([1 / 3]))[0, 1] > 0.3  # a third of a turn moves red toward green
