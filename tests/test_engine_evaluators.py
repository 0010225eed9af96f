"""Evaluators: hand-computed accuracy, balanced accuracy, mIoU and k-NN; EMA warm-up values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vitkit.engine import (
    AccuracyEvaluator,
    KNNEvaluator,
    MeanEvaluator,
    MIoUEvaluator,
    ModelEma,
    ema_decay_at,
)


def one_hot_logits(pred: list[int], c: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), c).float() * 5


def test_accuracy_and_balanced_accuracy_by_hand():
    ev = AccuracyEvaluator(num_classes=3)
    # labels: five of class 0, one of class 1, none of class 2; split over two batches.
    ev.update({"label": torch.tensor([0, 0, 0])}, {"logits": one_hot_logits([0, 0, 0], 3)})
    ev.update({"label": torch.tensor([0, 0, 1])}, {"logits": one_hot_logits([0, 1, 0], 3)})
    m = ev.compute()
    assert m["acc1"] == pytest.approx(4 / 6)
    # class 0 recall 4/5, class 1 recall 0/1, class 2 absent: mean of the two present classes.
    assert m["balanced_acc"] == pytest.approx((4 / 5 + 0) / 2)
    assert m["per_class_count"] == [5, 1, 0] and m["per_class_correct"] == [4, 0, 0]
    assert m["acc5"] == 1.0  # top-5 of 3 classes
    logits = torch.cat([one_hot_logits([0, 0, 0], 3), one_hot_logits([0, 1, 0], 3)])
    want = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0, 0, 0, 0, 1])).item()
    assert m["loss"] == pytest.approx(want)
    assert ev.primary == "acc1" and ev.higher_is_better
    ev.reset()
    assert ev.compute() == {}


def test_miou_from_confusion_by_hand():
    ev = MIoUEvaluator(num_classes=3, ignore_index=255)
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]])  # (1, 2, 4)
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 0]]])
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()  # (1, 3, 2, 4)
    ev.update({"mask": target}, {"logits": logits})
    m = ev.compute()
    # class 0: TP 1, FP 1 (pixel 5), FN 1 (pixel 1) -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2
    assert m["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["pixel_acc"] == pytest.approx(4 / 6)
    assert ev.primary == "miou" and ev.higher_is_better


def test_knn_weighted_vote_by_hand():
    ev = KNNEvaluator(num_classes=2, k=3, temperature=0.5)
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    ev.set_bank(bank, torch.tensor([0, 0, 1, 1]))
    q = torch.tensor([[1.0, 0.2], [0.2, 1.0]])
    sims = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(bank, dim=-1).T
    # the query's 3 nearest: two of its own class and one of the other; weights exp(sim / T)
    top = sims[0].topk(3)
    votes0 = sum(math.exp(s / 0.5) for s, i in zip(top.values.tolist(), top.indices.tolist()) if i < 2)
    votes1 = sum(math.exp(s / 0.5) for s, i in zip(top.values.tolist(), top.indices.tolist()) if i >= 2)
    assert (votes0 > votes1) == (ev.predict(q)[0].item() == 0)
    ev.update({"label": torch.tensor([0, 0])}, {"features": q})
    assert ev.compute() == {"knn_acc": 0.5}


def test_mean_evaluator_picks_accuracy_or_loss():
    ev = MeanEvaluator()
    ev.update({}, {"loss": torch.tensor([1.0, 3.0])})
    assert ev.compute() == {"loss": 2.0} and ev.primary == "loss" and not ev.higher_is_better
    ev.update({}, {"loss": torch.tensor([2.0]), "acc1": torch.tensor([1.0])})
    assert ev.primary == "acc1" and ev.higher_is_better


def test_ema_decay_warmup_values_by_hand():
    assert ema_decay_at(0.999, 0) == pytest.approx(1 / 10)
    assert ema_decay_at(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay_at(0.999, 8) == pytest.approx(9 / 18)
    assert ema_decay_at(0.9, 100) == 0.9 and ema_decay_at(0.9, 100, warmup=False) == 0.9
    # (1 + t) / (10 + t) reaches 0.9 at t = 80
    assert ema_decay_at(0.9, 79) < 0.9 and ema_decay_at(0.9, 80) == pytest.approx(0.9)

    model = nn.BatchNorm1d(1)
    ema = ModelEma(model, decay=0.99, warmup=True)
    with torch.no_grad():
        model.weight.fill_(3.0)  # ema starts at 1.0
        model.running_mean.fill_(2.0)
        model.num_batches_tracked.fill_(5)
    ema.update(model)  # decay 0.1: 0.1 * 1 + 0.9 * 3
    assert ema.module.weight.item() == pytest.approx(2.8)
    assert ema.module.running_mean.item() == pytest.approx(0.9 * 2.0)  # buffers averaged too
    assert ema.module.num_batches_tracked.item() == 5  # integer buffers copied
    ema.update(model)  # decay 2/11
    assert ema.module.weight.item() == pytest.approx(2 / 11 * 2.8 + 9 / 11 * 3)
    assert ema.updates == 2


def test_summary_reports_balanced_accuracy_and_best_metric(tmp_path):
    from helpers import make_trainer

    tr = make_trainer(tmp_path, epochs=2)
    s = tr.fit()
    assert 0.0 <= s["val_balanced_acc"] <= 1.0 and s["objective"] == "supervised"
    assert s["best_metric"] == "acc1" and s["best_metric_value"] == s["best_val_acc"]
    assert sum(s["val_per_class_count"]) == 32
