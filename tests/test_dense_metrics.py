"""Dense metrics: mIoU, per-class IoU and pixel accuracy against torchmetrics (their peer); depth
metrics on hand-made maps; both reduced across two processes like the other evaluators."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_same_run, crash_and_resume, free_port, make_trainer, require_peer
from torch import nn
from torch.utils.data import Dataset

from vitkit.engine.evaluators import DepthEvaluator, MIoUEvaluator
from vitkit.errors import DataError
from vitkit.objectives import build_objective


def random_batches(num_classes, ignore_index, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        logits = torch.randn(2, num_classes, 9, 7, generator=g)
        logits[:, num_classes - 1] -= 10  # the last class is never predicted...
        mask = torch.randint(0, num_classes - 2, (2, 9, 7), generator=g)  # ... nor present: absent from both
        mask[:, 0, 0] = num_classes - 2  # this one is only in the target at two pixels
        mask[torch.rand(2, 9, 7, generator=g) < 0.25] = ignore_index
        out.append(({"mask": mask}, {"logits": logits}))
    return out


@pytest.mark.peer("torchmetrics")
@pytest.mark.parametrize("num_classes,ignore_index", [(6, 255), (11, 11)])
def test_miou_per_class_iou_and_pixel_acc_match_torchmetrics(num_classes, ignore_index):
    tm = require_peer("torchmetrics")
    jac_none = tm.classification.MulticlassJaccardIndex(num_classes, average=None, ignore_index=ignore_index)
    jac_macro = tm.classification.MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index)
    acc = tm.classification.MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index)
    ev = MIoUEvaluator(num_classes, ignore_index)
    for batch, outputs in random_batches(num_classes, ignore_index):
        ev.update(batch, outputs)
        for metric in (jac_none, jac_macro, acc):
            metric.update(outputs["logits"].argmax(1), batch["mask"])
    m = ev.compute()
    assert m["miou"] == pytest.approx(jac_macro.compute().item(), abs=1e-6)
    assert m["pixel_acc"] == pytest.approx(acc.compute().item(), abs=1e-6)
    per_class = jac_none.compute().tolist()
    assert m["per_class_iou"][-1] is None  # absent from target and prediction
    assert [v for v in m["per_class_iou"] if v is not None] == pytest.approx(per_class[:-1], abs=1e-6)
    cm = tm.functional.classification.multiclass_confusion_matrix(
        torch.cat([o["logits"].argmax(1) for _, o in random_batches(num_classes, ignore_index)]),
        torch.cat([b["mask"] for b, _ in random_batches(num_classes, ignore_index)]),
        num_classes, ignore_index=ignore_index,
    )
    assert torch.equal(ev.total_confusion, cm)  # rows: true class, columns: predicted


def test_miou_rejects_a_class_id_outside_the_classes():
    ev = MIoUEvaluator(3, ignore_index=255)
    with pytest.raises(DataError, match="ignore_index"):
        ev.update({"mask": torch.tensor([[[0, 7]]])}, {"logits": torch.zeros(1, 3, 1, 2)})


def test_depth_metrics_by_hand():
    gt = torch.tensor([[[1.0, 2.0], [4.0, 0.0]], [[2.0, 2.0], [0.0, 0.0]]])  # 0: invalid
    pred = torch.tensor([[[1.1, 3.0], [4.0, 9.0]], [[1.0, 2.0], [5.0, 5.0]]]).unsqueeze(1)
    ev = DepthEvaluator()
    ev.update({"depth": gt}, {"depth": pred})
    m = ev.compute()
    # image 1: |0.1|/1, |1|/2, 0 -> absrel 0.6/3; rmse sqrt((0.01 + 1 + 0) / 3); ratios 1.1, 1.5, 1 -> 2/3
    # image 2: 1/2, 0 -> absrel 0.25; rmse sqrt(1 / 2); ratios 2, 1 -> 1/2
    assert m["absrel"] == pytest.approx((0.6 / 3 + 0.25) / 2)
    assert m["rmse"] == pytest.approx((math.sqrt(1.01 / 3) + math.sqrt(0.5)) / 2)
    assert m["delta1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert ev.primary == "absrel" and not ev.higher_is_better
    ev.reset()
    assert ev.compute() == {}


def test_depth_alignment_recovers_affine_predictions():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 6, 5, generator=g) * 8 + 1
    gt[0, 0] = 0
    # scale and shift in depth: exact after "scale_shift", not after "scale" or "none"
    ev = {a: DepthEvaluator(align=a) for a in ("scale_shift", "scale", "none")}
    for e in ev.values():
        e.update({"depth": gt}, {"depth": (0.3 * gt + 2.0).unsqueeze(1)})
    got = {a: e.compute() for a, e in ev.items()}
    assert got["scale_shift"]["absrel"] == pytest.approx(0.0, abs=1e-6) and got["scale_shift"]["delta1"] == 1.0
    # the scale fit minimises each image's squared error, so its RMSE is at most that of s = 1
    assert got["scale"]["absrel"] > 0.01 and got["none"]["rmse"] > got["scale"]["rmse"]
    # MiDaS: the model predicts disparity up to scale and shift; aligned to 1/gt, inverted back to depth
    e = DepthEvaluator(align="scale_shift", space="disparity")
    e.update({"depth": gt}, {"depth": torch.where(gt > 0, 5 / gt + 0.7, 123.0).unsqueeze(1)})
    m = e.compute()
    assert m["absrel"] == pytest.approx(0.0, abs=1e-6) and m["rmse"] == pytest.approx(0.0, abs=1e-5)
    # a disparity far too small is capped at 1 / max_depth
    e = DepthEvaluator(align="none", space="disparity", max_depth=10.0)
    e.update({"depth": torch.tensor([[[5.0]]])}, {"depth": torch.tensor([[[[1e-6]]]])})
    assert e.compute()["absrel"] == pytest.approx(1.0)


def _reduce_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        seg, dep = MIoUEvaluator(5, 255), DepthEvaluator(align="scale")
        for i, (batch, outputs) in enumerate(random_batches(5, 255, n=4)):
            if i % world == rank:
                seg.update(batch, outputs)
        gt = torch.rand(4, 6, 6, generator=torch.Generator().manual_seed(1)) + 0.5
        pred = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(2)) + 0.5
        dep.update({"depth": gt[rank::world]}, {"depth": pred[rank::world]})
        (Path(out_dir) / f"{rank}.json").write_text(json.dumps([seg.compute(), dep.compute()]))
    finally:
        dist.destroy_process_group()


def test_dense_evaluators_reduce_across_processes(tmp_path):
    seg, dep = MIoUEvaluator(5, 255), DepthEvaluator(align="scale")
    for batch, outputs in random_batches(5, 255, n=4):
        seg.update(batch, outputs)
    gt = torch.rand(4, 6, 6, generator=torch.Generator().manual_seed(1)) + 0.5
    pred = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(2)) + 0.5
    dep.update({"depth": gt}, {"depth": pred})
    want = (seg.compute(), dep.compute())
    mp.spawn(_reduce_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got[0]["miou"] == pytest.approx(want[0]["miou"]) and got[0]["per_class_iou"] == want[0]["per_class_iou"]
        assert got[1] == pytest.approx(want[1])


class Scenes(Dataset):
    """3x8x8 random images; the mask thresholds the first channel, the depth is 1 + a smooth map of it."""

    def __init__(self, n: int = 16, seed: int = 0):
        self.x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        mask = (x[0] > -0.4).long() + (x[0] > 0.4).long()
        mask[0, 0] = 255  # void
        depth = 1.5 + x[0].tanh()
        depth[-1] = 0  # unknown
        return {"image": x, "mask": mask, "depth": depth}


def dense_trainer(out, task="segment", **kw):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3 if task == "segment" else 1, 1))
    cfg = {"dice_weight": 0.5, "class_weights": "median_frequency"} if task == "segment" else {}
    obj = build_objective(task, net, cfg, num_classes=3, ignore_index=255, class_counts=[30, 20, 10])
    return make_trainer(out, objective=obj, dataset=Scenes(), val_dataset=Scenes(8, seed=1), transform=None,
                        epochs=3, batch_size=4, optim={"lr": 5e-2}, **kw)


@pytest.mark.parametrize("task", ["segment", "depth"])
def test_dense_objectives_train_evaluate_and_resume_bitwise(tmp_path, task):
    full = dense_trainer(tmp_path / "full", task)
    primary = "miou" if task == "segment" else "absrel"
    before = full.evaluate()[primary]
    s = full.fit()
    assert (s[f"val_{primary}"] > before) if task == "segment" else (s[f"val_{primary}"] < before)
    if task == "segment":
        assert len(s["val_per_class_iou"]) == 3 and 0 < s["val_pixel_acc"] <= 1
    else:
        assert 0 <= s["val_delta1"] <= 1 and s["val_rmse"] > 0
    resumed = crash_and_resume(dense_trainer, tmp_path / "run", 5, task=task, ckpt_every_steps=4)
    assert_same_run(full, resumed)
