"""Objective contracts: one small objective per contract trains through the one Trainer and resumes
bitwise (frozen teacher, two-view contrastive under 2-process gloo, a mask task scored by mIoU),
best/ follows the evaluator's declared direction, and a failure on one process stops all of them."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import (
    TinyNet,
    ToyDataset,
    assert_same_run,
    assert_same_state,
    crash_and_resume,
    free_port,
    make_trainer,
)
from torch import nn
from torch.utils.data import Dataset

from vitkit.engine import Evaluator, MIoUEvaluator, find_latest, load_checkpoint
from vitkit.engine.distributed import all_gather_with_grad, get_rank
from vitkit.errors import DataError, TrainingError
from vitkit.objectives import Objective, StepContext, Supervised

# ---------------------------------------------------------------- frozen teacher (distillation)


class Distill(Objective):
    """KD from a frozen teacher with BatchNorm and dropout, recorded by reference (not saved)."""

    def __init__(self):
        super().__init__()
        self.model = TinyNet(drop=0.0)
        self.teacher = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 3))
        self.teacher_modes: list[bool] = []
        self.contexts: list[tuple[int, int, bool]] = []

    def frozen_modules(self):
        return {"teacher": self.teacher}

    def references(self):
        return {"teacher": {"source": "teacher.safetensors", "sha256": "ab" * 32}}

    def forward(self, batch):
        if self.training:  # training forwards only (the default evaluate also runs forward)
            self.teacher_modes.append(any(m.training for m in self.teacher.modules()))
        with torch.no_grad():
            t = F.softmax(self.teacher(batch["image"]) / 2.0, dim=-1)
        s = self.model(batch["image"])
        kd = F.kl_div(F.log_softmax(s / 2.0, dim=-1), t, reduction="batchmean")
        return {"loss": 0.5 * kd + 0.5 * F.cross_entropy(s, batch["label"])}

    def on_step_end(self, ctx: StepContext):
        self.contexts.append((ctx.step, ctx.total_steps, ctx.optimizer is ctx.trainer.optimizer))


def distill_trainer(out, **kw):
    torch.manual_seed(1)  # the same student and teacher in every run
    return make_trainer(out, objective=Distill(), **kw)


def test_frozen_teacher_stays_eval_is_not_optimised_nor_saved(tmp_path):
    tr = distill_trainer(tmp_path / "full", epochs=2)
    teacher_before = {k: v.clone() for k, v in tr.objective.teacher.state_dict().items()}
    tr.fit()
    obj = tr.objective
    assert len(obj.teacher_modes) == 16 and not any(obj.teacher_modes)  # eval mode through fit()
    opt_params = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in obj.teacher.parameters())
    assert all(id(p) in opt_params for p in obj.model.parameters())
    assert_same_state(teacher_before, obj.teacher.state_dict(), "teacher")  # BatchNorm stats untouched
    ck = load_checkpoint(tmp_path / "full")
    assert not any(k.startswith("teacher.") for k in ck["objective"])
    assert set(ck["model"]) == set(obj.model.state_dict())
    assert ck["trainer_state"]["references"]["teacher"]["source"] == "teacher.safetensors"
    assert obj.contexts[-1] == (16, 16, True)  # on_step_end(ctx) sees step, total and the optimizer

    resumed = crash_and_resume(distill_trainer, tmp_path / "run", 6, epochs=2, ckpt_every_steps=4)
    assert_same_run(tr, resumed)


# ---------------------------------------------------------------- two-view contrastive


class TwoViews(Dataset):
    """Two deterministic views of each sample (a dict transform: shift and scale)."""

    def __init__(self, n: int = 32):
        self.x = torch.randn(n, 8, generator=torch.Generator().manual_seed(5))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        return {"views": [x + 0.1, x * 0.9], "label": torch.tensor(0)}


class NTXent(Objective):
    """SimCLR's NT-Xent over the global batch: embeddings of every process via all_gather_with_grad."""

    def __init__(self, temperature: float = 0.5):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.temperature = temperature

    def forward(self, batch):
        a, b = (F.normalize(self.model(v), dim=-1) for v in batch["views"])  # 2 x (B, D)
        a, b = all_gather_with_grad(a), all_gather_with_grad(b)  # 2 x (world * B, D)
        z = torch.cat([a, b])  # (2N, D)
        n = a.shape[0]
        sim = z @ z.T / self.temperature
        sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
        return {"loss": F.cross_entropy(sim, target)}


def contrastive_trainer(out, batch_size=8, rank=0, world=1, **kw):
    torch.manual_seed(2)
    return make_trainer(
        out, objective=NTXent(), dataset=TwoViews(), val_dataset=TwoViews(8), transform=None,
        batch_size=batch_size, rank=rank, world=world, epochs=2, **kw,
    )


def _init_group(rank: int, world: int, port: int, backend: str = "gloo") -> None:
    import os

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from vitkit.engine.distributed import init_distributed

    init_distributed(backend)


def _contrastive_worker(rank: int, world: int, port: int, out: str) -> None:
    from vitkit.engine.distributed import all_reduce_sum, shutdown_distributed

    _init_group(rank, world, port)
    # Loss and gradients of one step on this rank's half of a fixed global batch of 8.
    torch.manual_seed(2)
    obj = NTXent()
    ds = TwoViews()
    idx = list(range(rank * 4, rank * 4 + 4))
    batch = {"views": [torch.stack([ds[i]["views"][j] for i in idx]) for j in range(2)]}
    loss = obj(batch)["loss"]
    loss.backward()
    grads = [all_reduce_sum(p.grad.clone()) / world for p in obj.parameters()]  # what DDP averages
    mean_loss = all_reduce_sum(loss.detach().clone()) / world
    tr = contrastive_trainer(out, batch_size=4, rank=rank, world=world)
    tr.fit()
    if rank == 0:
        torch.save({"loss": mean_loss, "grads": grads, "objective": tr.objective.state_dict()}, f"{out}/result.pt")
    del tr
    shutdown_distributed()


def test_contrastive_gather_with_grad_matches_one_process(tmp_path):
    torch.manual_seed(2)
    obj = NTXent()
    ds = TwoViews()
    batch = {"views": [torch.stack([ds[i]["views"][j] for i in range(8)]) for j in range(2)]}
    loss = obj(batch)["loss"]
    loss.backward()
    single = contrastive_trainer(tmp_path / "single")
    single.fit()

    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_contrastive_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    r = torch.load(out / "result.pt", weights_only=True)
    torch.testing.assert_close(r["loss"], loss.detach(), atol=1e-6, rtol=1e-6)
    for p, g in zip(obj.parameters(), r["grads"]):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)
    ref = single.objective.state_dict()
    for k, v in r["objective"].items():
        torch.testing.assert_close(v, ref[k], atol=1e-5, rtol=0, msg=k)


def test_contrastive_resumes_bitwise(tmp_path):
    full = contrastive_trainer(tmp_path / "full")
    full.fit()
    resumed = crash_and_resume(contrastive_trainer, tmp_path / "run", 5, ckpt_every_steps=3)
    assert_same_run(full, resumed, optimizer=False)


# ---------------------------------------------------------------- a metric that is not a per-sample mean


class Masks(Dataset):
    """1x6x6 random images; the mask labels each pixel 0/1/2 by thresholds of its value."""

    def __init__(self, n: int = 32, seed: int = 0):
        self.x = torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        mask = (x[0] > -0.4).long() + (x[0] > 0.4).long()  # (6, 6)
        return {"image": x, "mask": mask}


class Segment(Objective):
    """Per-pixel cross-entropy of a tiny conv net; scored by mIoU."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))

    def forward(self, batch):
        return {"loss": F.cross_entropy(self.model(batch["image"]), batch["mask"])}

    def evaluator(self):
        return MIoUEvaluator(num_classes=3)

    def eval_outputs(self, batch, model=None):
        return {"logits": (model if model is not None else self.model)(batch["image"])}


def segment_trainer(out, **kw):
    torch.manual_seed(3)
    return make_trainer(
        out, objective=Segment(), dataset=Masks(), val_dataset=Masks(16, seed=1), transform=None,
        epochs=3, optim={"lr": 5e-2}, **kw,
    )


def test_miou_objective_trains_and_resumes_bitwise(tmp_path):
    full = segment_trainer(tmp_path / "full", ema_decay=0.9)
    before = full.evaluate()["miou"]
    s = full.fit()
    assert s["val_miou"] > before and 0 < s["val_pixel_acc"] <= 1
    assert s["best_metric"] == "miou" and s["best_metric_value"] >= s["val_miou"]
    assert "val_ema_miou" in s  # the EMA copy is evaluated by passing it, not by swapping objective.model
    resumed = crash_and_resume(segment_trainer, tmp_path / "run", 10, ema_decay=0.9, ckpt_every_steps=4)
    assert_same_run(full, resumed, optimizer=False, ema=True)


class Scripted(Evaluator):
    """A fake metric with scripted values per evaluation pass."""

    def __init__(self, values, higher_is_better):
        self.values, self.higher_is_better, self.primary = values, higher_is_better, "score"

    def update(self, batch, outputs):
        pass

    def compute(self):
        return {"score": self.values.pop(0)}


@pytest.mark.parametrize(("higher", "best_epoch"), [(True, 2), (False, 3)])
def test_best_checkpoint_follows_declared_direction(tmp_path, higher, best_epoch):
    values = [0.5, 0.9, 0.1, 0.7]

    class Obj(Supervised):
        def evaluator(self):
            return Scripted(values, higher)

    tr = make_trainer(tmp_path, objective=Obj(TinyNet(), 3), epochs=4, keep_last=5)
    s = tr.fit()
    source = (tmp_path / "checkpoints" / "best" / "source").read_text().strip()
    assert source == f"step_{8 * best_epoch:06d}"
    assert s["best_metric"] == "score" and s["best_metric_value"] == (0.9 if higher else 0.1)


# ---------------------------------------------------------------- failures: checkpoint, then stop


class FailAt(Supervised):
    """Supervised whose forward raises a DataError on call ``call`` of process ``rank``."""

    def __init__(self, call: int, rank: int = 0, drop: float = 0.0):
        super().__init__(TinyNet(drop=drop), num_classes=3, label_smoothing=0.0)
        self.call, self.fail_rank, self.calls = call, rank, 0

    def forward(self, batch):
        self.calls += 1
        if self.calls == self.call and get_rank() == self.fail_rank:
            raise DataError(f"bad batch at call {self.calls}")
        return super().forward(batch)


def test_failure_mid_run_checkpoints_last_step_and_resumes_bitwise(tmp_path):
    full = make_trainer(tmp_path / "full", epochs=2)
    full.fit()
    torch.manual_seed(0)
    run = tmp_path / "run"
    with pytest.raises(DataError, match="bad batch at call 12"):
        make_trainer(run, objective=FailAt(12, drop=0.1), epochs=2).fit()
    assert find_latest(run).name == "step_000011"  # saved on the way out, not only the epoch-8 one
    resumed = make_trainer(run, epochs=2)
    resumed.fit(resume=True)
    assert_same_state(full.objective.state_dict(), resumed.objective.state_dict(), "objective")
    assert_same_state(full.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")


class BadLoaderData(ToyDataset):
    """Rank 0's 10th read fails like a truncated image."""

    reads = 0

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == 10 and get_rank() == 0:
            raise DataError("image 5 is truncated")
        return super().__getitem__(i)


class NaNOnSave:
    """Hook: makes rank 0's weights NaN after the last step, so its checkpoint write fails."""

    def on_step_end(self, ctx):
        if ctx.step == ctx.total_steps and get_rank() == 0:
            with torch.no_grad():
                next(ctx.trainer.objective.parameters()).fill_(float("nan"))


def _failing_worker(rank: int, world: int, port: int, out: str, case: str) -> None:
    from vitkit.engine.distributed import shutdown_distributed

    _init_group(rank, world, port)
    t0 = time.time()
    try:
        if case == "objective":
            tr = make_trainer(out, objective=FailAt(3, rank=1), rank=rank, world=world, epochs=1, transform=None)
        elif case == "loader":
            tr = make_trainer(out, dataset=BadLoaderData(64), rank=rank, world=world, epochs=1, transform=None)
        else:
            tr = make_trainer(out, hooks=[NaNOnSave()], rank=rank, world=world, epochs=1, transform=None)
        tr.fit()
        result = {"error": None}
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}", "training_error": isinstance(e, TrainingError)}
    result["seconds"] = time.time() - t0
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    shutdown_distributed(wait=False)


@pytest.mark.parametrize(
    ("case", "failed", "message"),
    [("objective", 1, "bad batch at call 3"), ("loader", 0, "image 5 is truncated"), ("save", 0, "NaN or inf")],
)
def test_agreed_error_stops_every_rank_with_its_message(tmp_path, case, failed, message):
    mp.spawn(_failing_worker, args=(2, free_port(), str(tmp_path), case), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["error"] is not None and message in res["error"], res
        assert res["seconds"] < 30
        if r != failed:
            assert res["training_error"] and f"rank {failed} failed: " in res["error"]


# ---------------------------------------------------------------- collectives on the group's device


def _collectives_worker(rank: int, world: int, port: int, out: str, backend: str) -> None:
    from vitkit.engine.distributed import all_reduce_sum, group_device, shutdown_distributed
    from vitkit.engine.evaluators import AccuracyEvaluator

    _init_group(rank, world, port, backend)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    cpu = all_reduce_sum(torch.tensor([1.0, float(rank)], dtype=torch.float64))  # a CPU tensor, as the summary's
    ev = AccuracyEvaluator(2)
    ev.update({"label": torch.tensor([rank])}, {"logits": torch.tensor([[1.0, 0.0]])})
    acc = ev.compute()
    x = torch.full((2, 3), float(rank + 1), device=group_device(), requires_grad=True)
    g = all_gather_with_grad(x)
    (g * torch.arange(4.0, device=g.device)[:, None]).sum().backward()
    if rank == 0:
        torch.save({"cpu": cpu, "acc": acc, "grad": x.grad.cpu(), "device": str(group_device()), "g": g.detach().cpu()},
                   f"{out}/collectives.pt")
    shutdown_distributed()


def _check_collectives(out, backend):
    r = torch.load(out / "collectives.pt", weights_only=True)
    assert r["cpu"].tolist() == [2.0, 1.0] and r["cpu"].device.type == "cpu"
    assert r["acc"]["acc1"] == 0.5 and r["acc"]["per_class_count"] == [1, 1]
    assert r["device"].startswith("cuda" if backend == "nccl" else "cpu")
    assert r["g"][:, 0].tolist() == [1.0, 1.0, 2.0, 2.0]
    # rank 0's rows are 0 and 1 of the gather; both ranks' losses weight them by 0 and 1: 2 * (0, 1)
    assert r["grad"][:, 0].tolist() == [0.0, 2.0]


def test_collectives_under_gloo(tmp_path):
    mp.spawn(_collectives_worker, args=(2, free_port(), str(tmp_path), "gloo"), nprocs=2, join=True)
    _check_collectives(tmp_path, "gloo")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs (one per process)")
def test_collectives_under_nccl(tmp_path):
    mp.spawn(_collectives_worker, args=(2, free_port(), str(tmp_path), "nccl"), nprocs=2, join=True)
    _check_collectives(tmp_path, "nccl")


class ExportsTeacher(Distill):
    """A teacher that is state (an EMA teacher would be): saved, and the module the run exports."""

    def references(self):
        return {}

    def export_model(self):
        return self.teacher


def test_export_model_is_what_the_checkpoint_exports_and_state_teachers_are_saved(tmp_path):
    torch.manual_seed(1)
    tr = make_trainer(tmp_path, objective=ExportsTeacher(), epochs=1)
    tr.fit()
    ck = load_checkpoint(tmp_path)
    assert set(ck["model"]) == set(tr.objective.teacher.state_dict())
    assert "teacher.1.running_mean" in ck["objective"] and ck["trainer_state"]["references"] == {}


def test_knn_evaluator_builds_its_bank_in_the_evaluation_loop():
    from torch.utils.data import DataLoader

    from vitkit.engine.evaluation import run_evaluation
    from vitkit.engine.evaluators import KNNEvaluator

    class Features(Objective):
        def __init__(self):
            super().__init__()
            self.model = nn.Identity()

        def eval_outputs(self, batch, model=None):
            return {"features": model(batch["image"])}

    def blobs(n, seed):  # two well-separated clusters, label = cluster
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 2
        x = torch.randn(n, 4, generator=g) * 0.1 + torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0]])[y]
        return [{"image": x[i], "label": y[i]} for i in range(n)]

    ev = KNNEvaluator(num_classes=2, k=5, bank_loader=DataLoader(blobs(20, 0), batch_size=8))
    obj = Features()
    m = run_evaluation(obj, obj.model, ev, DataLoader(blobs(10, 1), batch_size=4), lambda b: b,
                       contextlib.nullcontext)
    assert m == {"knn_acc": 1.0} and ev.bank.shape == (20, 4)
