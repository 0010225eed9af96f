"""data.balance: the class-balanced sampler's frequencies (binomial and chi-square bounds), its DDP split
and exact resume; the balanced class weights and the weighted cross-entropy against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import Crash, CrashAt, ToyDataset, assert_same_state, make_trainer
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from vitkit.data.balance import ClassBalancedSampler, balanced_class_weights, build_balance, check_weighted
from vitkit.data.mix import smooth_one_hot
from vitkit.errors import ConfigError, DataError
from vitkit.objectives import Supervised

# ---- class weights ---------------------------------------------------------------------------------


def test_balanced_weights_by_hand():
    # n = 10 images, k = 3 classes with images: w_c = 10 / (3 n_c); the empty class gets 0.
    w = balanced_class_weights([6, 3, 1, 0])
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3, 0.0], rel=1e-6)
    # Every class carries the same total weight, and the weights average 1 over the images.
    assert (6 * w[0]).item() == pytest.approx((3 * w[1]).item()) == pytest.approx((1 * w[2]).item())
    assert float(6 * w[0] + 3 * w[1] + 1 * w[2]) / 10 == pytest.approx(1.0)


@pytest.mark.parametrize("counts", [[], [0, 0], [3, -1]])
def test_balanced_weights_need_labelled_images(counts):
    with pytest.raises(DataError, match="class counts"):
        balanced_class_weights(counts)


def _hand_loss(logits, targets, weights) -> float:
    """mean_i sum_c w_c t_ic (-log softmax(logits_i)_c), with Python floats."""
    total = 0.0
    for row, t in zip(logits.tolist(), targets):
        log_z = math.log(sum(math.exp(v) for v in row))
        total += sum(w * tc * (log_z - v) for v, tc, w in zip(row, t, weights))
    return total / len(targets)


LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0], [1.0, 0.0, -2.0]])
LABELS = torch.tensor([0, 0, 1, 2])
COUNTS = [6, 3, 1]
EPS = 0.1


def _smoothed(label: int, eps: float = EPS, k: int = 3) -> list[float]:
    return [1 - eps + eps / k if c == label else eps / k for c in range(k)]


def test_weighted_cross_entropy_with_label_smoothing_by_hand():
    w = balanced_class_weights(COUNTS)
    obj = Supervised(nn.Identity(), num_classes=3, label_smoothing=EPS, class_weights=w)
    got = obj.task_loss(LOGITS, {"label": LABELS})
    want = _hand_loss(LOGITS, [_smoothed(int(y)) for y in LABELS], [10 / 18, 10 / 9, 10 / 3])
    assert got.item() == pytest.approx(want, rel=1e-6)
    # Hard labels and their smoothed one-hot targets (mixup's format) give the same loss.
    soft = obj.task_loss(LOGITS, {"target": smooth_one_hot(LABELS, 3, EPS)})
    assert soft.item() == pytest.approx(want, rel=1e-6)


def test_weighted_cross_entropy_with_mixup_targets_by_hand():
    """Mixup's target is lam * smoothed(y) + (1 - lam) * smoothed(y mirrored): each part is weighted by its own class."""
    w = balanced_class_weights(COUNTS)
    obj = Supervised(nn.Identity(), num_classes=3, label_smoothing=EPS, class_weights=w)
    lam = 0.7
    mirrored = LABELS.flip(0).tolist()
    targets = [[lam * a + (1 - lam) * b for a, b in zip(_smoothed(int(y)), _smoothed(m))]
               for y, m in zip(LABELS.tolist(), mirrored)]
    got = obj.task_loss(LOGITS, {"target": torch.tensor(targets)})
    assert got.item() == pytest.approx(_hand_loss(LOGITS, targets, [10 / 18, 10 / 9, 10 / 3]), rel=1e-6)
    # PyTorch's weighted cross-entropy for probability targets (mean over the batch) agrees.
    assert got.item() == pytest.approx(F.cross_entropy(LOGITS, torch.tensor(targets), weight=w).item(), rel=1e-6)
    # By linearity: lam * the loss of the labels + (1 - lam) * the loss of the mirrored labels.
    parts = [obj.task_loss(LOGITS, {"label": y}) for y in (LABELS, LABELS.flip(0))]
    assert got.item() == pytest.approx(lam * parts[0].item() + (1 - lam) * parts[1].item(), rel=1e-6)


def test_unit_weights_are_the_unweighted_loss():
    plain = Supervised(nn.Identity(), num_classes=3, label_smoothing=EPS)
    ones = Supervised(nn.Identity(), num_classes=3, label_smoothing=EPS, class_weights=torch.ones(3))
    for batch in ({"label": LABELS}, {"target": smooth_one_hot(LABELS.flip(0), 3, EPS)}):
        assert ones.task_loss(LOGITS, batch).item() == pytest.approx(plain.task_loss(LOGITS, batch).item(), rel=1e-6)


def test_weights_follow_the_objective_to_its_device_but_not_into_checkpoints():
    obj = Supervised(nn.Linear(4, 3), num_classes=3, class_weights=torch.tensor([1.0, 2.0, 3.0]))
    assert "class_weights" not in obj.state_dict()
    assert obj.to(torch.float64).class_weights.dtype == torch.float64  # a buffer: moves with the module


@pytest.mark.parametrize("weights", [[1.0, 2.0], [1.0, -1.0, 1.0], [1.0, float("nan"), 1.0]])
def test_bad_class_weights_are_config_errors(weights):
    with pytest.raises(ConfigError, match="one finite weight >= 0 per class"):
        Supervised(nn.Identity(), num_classes=3, class_weights=torch.tensor(weights))


def test_weights_need_an_objective_that_takes_them():
    w = balanced_class_weights(COUNTS)
    check_weighted(Supervised(nn.Identity(), num_classes=3, class_weights=w), "supervised", w)
    check_weighted(nn.Identity(), "mae", None)
    with pytest.raises(ConfigError, match="data.balance=sampler"):
        check_weighted(Supervised(nn.Identity(), num_classes=3), "kd", w)


# ---- the sampler ------------------------------------------------------------------------------------

LABELS_1000 = [0] * 800 + [1] * 150 + [2] * 50


def _chi_square_bound(df: int, z: float = 4.26) -> float:
    """The chi-square quantile at the normal quantile ``z`` (4.26: one in 100,000), by Wilson-Hilferty."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def test_sampler_draws_every_class_equally_often():
    sampler = ClassBalancedSampler(LABELS_1000, seed=0, num_replicas=1, rank=0)
    assert len(sampler) == 1000  # an epoch keeps the data's length
    draws = []
    for epoch in range(10):
        sampler.set_epoch(epoch)
        draws += list(sampler)
    n = len(draws)
    labels = torch.tensor(LABELS_1000)[torch.tensor(draws)]
    # Each class: Binomial(n, 1/3); 4.5 standard deviations (one in ~150,000 per class).
    sd = math.sqrt(n * (1 / 3) * (2 / 3))
    for c in range(3):
        assert abs(int((labels == c).sum()) - n / 3) < 4.5 * sd, c
    # Within a class every image is equally likely: chi-square of the per-image counts.
    counts = torch.bincount(torch.tensor(draws), minlength=1000)
    for c, (lo, hi) in ((1, (800, 950)), (2, (950, 1000))):
        per_image = counts[lo:hi].double()
        expected = per_image.sum() / (hi - lo)
        chi2 = float(((per_image - expected) ** 2 / expected).sum())
        assert chi2 < _chi_square_bound(hi - lo - 1), (c, chi2)


def test_sampler_skips_labels_nobody_has():
    labels = [0] * 90 + [3] * 10 + [1] * 20  # no image of class 2
    sampler = ClassBalancedSampler(labels, seed=5, num_replicas=1, rank=0)
    drawn = torch.tensor(labels)[torch.tensor(list(sampler))]
    n = len(labels)
    sd = math.sqrt(n * (1 / 3) * (2 / 3))
    assert int((drawn == 2).sum()) == 0
    for c in (0, 1, 3):
        assert abs(int((drawn == c).sum()) - n / 3) < 4.5 * sd


def test_sampler_is_a_function_of_seed_and_epoch():
    a = ClassBalancedSampler(LABELS_1000, seed=3, num_replicas=1, rank=0)
    b = ClassBalancedSampler(LABELS_1000, seed=3, num_replicas=1, rank=0)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(ClassBalancedSampler(LABELS_1000, seed=4, num_replicas=1, rank=0)) != first


def test_sampler_splits_one_epoch_over_ranks():
    whole = list(ClassBalancedSampler(LABELS_1000[:999], seed=2, num_replicas=1, rank=0))
    ranks = [list(ClassBalancedSampler(LABELS_1000[:999], seed=2, num_replicas=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 500  # padded by the epoch's first index, as ResumableSampler does
    padded = whole + whole[:1]
    assert ranks[0] == padded[0::2] and ranks[1] == padded[1::2]


def test_sampler_resumes_mid_epoch():
    sampler = ClassBalancedSampler(LABELS_1000, seed=7, num_replicas=1, rank=0)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.advance(37)
    again = ClassBalancedSampler(LABELS_1000, seed=7, num_replicas=1, rank=0)
    again.load_state_dict(sampler.state_dict())
    assert list(again) == whole[37:]


def test_training_with_the_sampler_resumes_bitwise(tmp_path):
    ds = ToyDataset(64)

    def trainer(out, hooks=()):
        torch.manual_seed(0)
        sampler = ClassBalancedSampler(ds.y.tolist(), seed=3, num_replicas=1, rank=0)
        tr = make_trainer(out, epochs=2, ckpt_every_steps=4, hooks=hooks)
        tr.train_loader = DataLoader(ds, batch_size=8, sampler=sampler, drop_last=True)
        tr.sampler = sampler
        return tr

    full = trainer(tmp_path / "full")
    full.fit()
    with pytest.raises(Crash):
        trainer(tmp_path / "run", hooks=[CrashAt(7)]).fit()
    resumed = trainer(tmp_path / "run")
    resumed.fit(resume=True)
    assert resumed.step == full.step == 16
    assert_same_state(full.objective.state_dict(), resumed.objective.state_dict())
    assert_same_state(full.optimizer.state_dict(), resumed.optimizer.state_dict())


# ---- build_balance ------------------------------------------------------------------------------------


class _Labelled:
    def __init__(self, targets):
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)


class _Stream(IterableDataset):
    targets = [0, 1]

    def __iter__(self):
        return iter(())


def test_build_balance_modes():
    ds = _Labelled([0] * 6 + [1] * 3 + [2])
    assert build_balance("none", ds) == (None, None)
    sampler, weights = build_balance("sampler", ds, seed=1)
    assert isinstance(sampler, ClassBalancedSampler) and weights is None and len(sampler) == 10
    sampler, weights = build_balance("loss", ds, (6, 3, 1))
    assert sampler is None and weights.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3], rel=1e-6)
    _, from_targets = build_balance("loss", ds)  # the counts from the labels when none are given
    assert torch.equal(from_targets, weights)


@pytest.mark.parametrize(
    ("mode", "ds", "kw", "needle"),
    [
        ("weights", _Labelled([0, 1]), {}, "data.balance must be one of none, sampler, loss"),
        ("sampler", _Stream(), {}, "use data.balance=loss"),
        ("sampler", _Labelled([0, 1]), {"repeated_aug": 3}, "data.repeated_aug=0"),
        ("sampler", object(), {}, "does not list"),
    ],
)
def test_build_balance_errors(mode, ds, kw, needle):
    with pytest.raises(ConfigError, match=needle):
        build_balance(mode, ds, **kw)
