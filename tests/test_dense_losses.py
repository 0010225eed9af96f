"""Dense losses against references written here from the papers' formulas: weighted cross-entropy
with ignore, SegNet's median frequency balancing, V-Net's soft Dice, MiDaS's SSI losses (least
squares through torch.linalg.lstsq; median/MAD normalisation, trimming) and gradient matching,
Eigen's scale-invariant log loss; and their invariances."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vitkit.dense.losses import (
    align_least_squares,
    class_weights,
    dice_loss,
    gradient_matching_loss,
    silog_loss,
    ssi_loss,
)
from vitkit.errors import ConfigError
from vitkit.objectives import build_objective


def depth_pair(seed=0, b=3, h=12, w=16):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, h, w, generator=g) * 4 + 0.5
    target[torch.rand(b, h, w, generator=g) < 0.2] = 0  # invalid pixels
    pred = torch.rand(b, 1, h, w, generator=g) * 3 + 0.2
    return pred, target, target > 0


# ---------------------------------------------------------------- segmentation


def test_median_frequency_and_inverse_weights_by_hand():
    # freq = count / all pixels = [1/6, 2/6, 3/6, -]; median of the seen classes 2/6
    w = class_weights("median_frequency", 4, [10, 20, 30, 0])
    torch.testing.assert_close(w, torch.tensor([2.0, 1.0, 2 / 3, 2.0]))
    # SegNet's exact freq: pixels of c over the pixels of the images holding c
    w = class_weights("median_frequency", 3, {"pixels": [10, 20, 30], "image_pixels": [100, 40, 60]})
    freq = [0.1, 0.5, 0.5]
    torch.testing.assert_close(w, torch.tensor([0.5 / f for f in freq]))
    inv = class_weights("inverse", 3, [10, 20, 30])
    raw = torch.tensor([6.0, 3.0, 2.0])
    torch.testing.assert_close(inv, raw / raw.mean())
    assert class_weights("none", 3, None) is None
    torch.testing.assert_close(class_weights([1, 2, 3], 3), torch.tensor([1.0, 2.0, 3.0]))


def test_class_weight_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="3 non-negative"):
        class_weights([1, 2], 3)
    with pytest.raises(ConfigError, match="class pixel counts"):
        class_weights("median_frequency", 3, None)
    with pytest.raises(ConfigError, match="not one of"):
        class_weights("bogus", 3, [1, 2, 3])


def test_weighted_cross_entropy_with_ignore_matches_the_formula():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1)
    obj = build_objective("segment", model, {"class_weights": [1.0, 2.0, 0.5, 3.0]}, num_classes=4,
                          ignore_index=255)
    image = torch.randn(2, 3, 6, 5)
    mask = torch.randint(0, 4, (2, 6, 5))
    mask[0, :2] = 255
    out = obj({"image": image, "mask": mask})
    logp = model(image).log_softmax(1)
    w = torch.tensor([1.0, 2.0, 0.5, 3.0])
    num = den = 0.0
    for b, i, j in ((b, i, j) for b in range(2) for i in range(6) for j in range(5)):
        y = int(mask[b, i, j])
        if y != 255:
            num -= w[y] * logp[b, y, i, j]
            den += w[y]
    torch.testing.assert_close(out["loss"], num / den)
    valid = mask != 255
    assert out["pixel_acc"] == pytest.approx(((logp.argmax(1) == mask) & valid).sum().item() / valid.sum().item())


def test_soft_dice_matches_vnet_formula_per_class_ignoring_void():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, 4, generator=g)
    target = torch.randint(0, 3, (2, 5, 4), generator=g)
    target[1, 0] = 255
    p = logits.softmax(1)
    terms = []
    for b in range(2):
        for c in range(3):
            inter = ps = gs = 0.0
            for i in range(5):
                for j in range(4):
                    if target[b, i, j] == 255:
                        continue
                    gij = float(target[b, i, j] == c)
                    inter += p[b, c, i, j] * gij
                    ps += p[b, c, i, j] ** 2
                    gs += gij**2
            terms.append(1 - (2 * inter + 1) / (ps + gs + 1))
    torch.testing.assert_close(dice_loss(logits, target, 255), torch.stack(terms).mean())


def test_segment_adds_dice_and_all_void_batch_gives_zero_loss():
    model = nn.Conv2d(3, 3, 1)
    obj = build_objective("segment", model, {"dice_weight": 0.5}, num_classes=3, ignore_index=255)
    image, mask = torch.randn(1, 3, 4, 4), torch.randint(0, 3, (1, 4, 4))
    out = obj({"image": image, "mask": mask})
    torch.testing.assert_close(out["loss"], out["ce"] + 0.5 * dice_loss(model(image), mask, 255))
    # a crop of void only: no pixel to score, so no loss (not cross-entropy's NaN); Dice of nothing is 0
    void = obj({"image": image, "mask": torch.full((1, 4, 4), 255)})
    assert void["loss"].item() == 0.0 and void["pixel_acc"].item() == 0.0


# ---------------------------------------------------------------- depth


def test_least_squares_alignment_matches_lstsq():
    pred, target, valid = depth_pair()
    aligned = align_least_squares(pred[:, 0], target, valid)
    for b in range(3):
        p, t = pred[b, 0][valid[b]], target[b][valid[b]]
        a = torch.stack([p, torch.ones_like(p)], 1).double()
        s, sh = torch.linalg.lstsq(a, t.double()[:, None]).solution[:, 0]
        torch.testing.assert_close(aligned[b][valid[b]].double(), s * p.double() + sh, rtol=1e-4, atol=1e-4)
        s_only = (p @ t) / (p @ p)
        torch.testing.assert_close(align_least_squares(pred[b : b + 1, 0], target[b : b + 1], valid[b : b + 1],
                                                       "scale")[0][valid[b]], s_only * p)
    # a constant prediction: the best fit is the target's mean
    const = align_least_squares(torch.ones(1, 4), torch.tensor([[1.0, 2.0, 3.0, 9.0]]), torch.tensor([[1, 1, 1, 0]]))
    torch.testing.assert_close(const, torch.full((1, 4), 2.0))


def test_ssi_mse_matches_lstsq_reference():
    pred, target, valid = depth_pair()
    want = []
    for b in range(3):
        p, t = pred[b, 0][valid[b]].double(), target[b][valid[b]].double()
        a = torch.stack([p, torch.ones_like(p)], 1)
        fit = a @ torch.linalg.lstsq(a, t[:, None]).solution
        want.append(((fit[:, 0] - t) ** 2).sum() / (2 * len(t)))
    torch.testing.assert_close(ssi_loss(pred, target, valid, "mse").double(), torch.stack(want).mean(),
                               rtol=1e-4, atol=1e-6)


def _robust(d):
    # eq. 5-6: the (lower) median and the mean absolute deviation from it
    t = d.sort().values[(len(d) - 1) // 2]
    return (d - t) / (d - t).abs().mean()


@pytest.mark.parametrize("variant", ["trim", "mae"])
def test_ssi_trimmed_and_mae_match_the_paper(variant):
    pred, target, valid = depth_pair(2)
    want = []
    for b in range(3):
        p, t = pred[b, 0][valid[b]], target[b][valid[b]]
        r = (_robust(p) - _robust(t)).abs().sort().values
        m = len(r)
        kept = r[: int(math.floor(0.8 * m))] if variant == "trim" else r
        want.append(kept.sum() / (2 * m))
    torch.testing.assert_close(ssi_loss(pred, target, valid, variant), torch.stack(want).mean(), rtol=1e-5, atol=1e-6)


def test_gradient_matching_matches_a_loop_reference():
    pred, target, valid = depth_pair(3, b=2, h=9, w=11)
    want = []
    for b in range(2):
        r = torch.zeros(9, 11)
        r[valid[b]] = _robust(pred[b, 0][valid[b]]) - _robust(target[b][valid[b]])
        total = 0.0
        for k in range(4):
            s = 2**k
            rk, mk = r[::s, ::s], valid[b, ::s, ::s]
            grads = 0.0
            for i in range(rk.shape[0]):
                for j in range(rk.shape[1]):
                    if j + 1 < rk.shape[1] and mk[i, j] and mk[i, j + 1]:
                        grads += (rk[i, j + 1] - rk[i, j]).abs()
                    if i + 1 < rk.shape[0] and mk[i, j] and mk[i + 1, j]:
                        grads += (rk[i + 1, j] - rk[i, j]).abs()
            total += grads / mk.sum()
        want.append(total)
    torch.testing.assert_close(gradient_matching_loss(pred, target, valid, "trim"), torch.stack(want).mean(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["trim", "mae", "mse"])
def test_ssi_and_gradient_terms_ignore_scale_and_shift_of_the_prediction(variant):
    pred, target, valid = depth_pair(4)
    moved = 3.7 * pred + 1.2
    torch.testing.assert_close(ssi_loss(moved, target, valid, variant), ssi_loss(pred, target, valid, variant),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gradient_matching_loss(moved, target, valid, variant),
                               gradient_matching_loss(pred, target, valid, variant), rtol=1e-4, atol=1e-5)
    assert ssi_loss(pred, target, valid, variant) > 1e-3  # not trivially zero


def test_silog_matches_eigen_and_bts_and_is_scale_invariant_at_lambda_one():
    pred, target, valid = depth_pair(5)
    d = pred[:, 0][valid].log() - target[valid].log()
    eigen = (d**2).mean() - 0.5 * d.mean() ** 2
    torch.testing.assert_close(silog_loss(pred, target, valid, lam=0.5, sqrt=False), eigen)
    bts = 10 * torch.sqrt((d**2).mean() - 0.85 * d.mean() ** 2)
    torch.testing.assert_close(silog_loss(pred, target, valid), bts)
    torch.testing.assert_close(silog_loss(2.5 * pred, target, valid, lam=1.0),
                               silog_loss(pred, target, valid, lam=1.0), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(silog_loss(2.5 * pred, target, valid), silog_loss(pred, target, valid))


def test_depth_objective_combines_ssi_and_gradient_matching_in_disparity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 1, 1), nn.Softplus())
    obj = build_objective("depth", model, None)
    image = torch.randn(2, 3, 8, 8)
    depth = torch.rand(2, 8, 8) * 5 + 1
    depth[0, 0] = 0
    out = obj({"image": image, "depth": depth})
    pred, valid = model(image), depth > 0
    disp = torch.where(valid, 1 / depth.clamp_min(1e-12), 0.0)
    want = ssi_loss(pred, disp, valid, "trim") + 0.5 * gradient_matching_loss(pred, disp, valid, "trim")
    torch.testing.assert_close(out["loss"], want)
    out["loss"].backward()
    assert model[0].weight.grad.abs().sum() > 0
    assert obj.evaluator().align == "scale_shift" and obj.evaluator().space == "disparity"
    with pytest.raises(ConfigError, match="silog"):
        build_objective("depth", model, {"loss": "silog", "space": "disparity"})
    with pytest.raises(ConfigError, match="ssi"):
        build_objective("depth", model, {"ssi": "huber"})
