"""Engine: training, exact resume, crash-safe checkpoints, non-finite handling, outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import (
    Crash,
    CrashAt,
    TinyNet,
    assert_same_run,
    assert_same_state,
    crash_and_resume,
    make_trainer,
)

from vitkit.engine import NonFiniteLossError, find_latest, load_checkpoint
from vitkit.engine import checkpoint as ckpt_mod
from vitkit.engine.checkpoint import NonFiniteWeightsError, save_checkpoint
from vitkit.engine.logging import read_metrics
from vitkit.objectives import Supervised


def test_training_reduces_loss_and_writes_outputs(tmp_path):
    tr = make_trainer(tmp_path, epochs=6, drop=0.0, log_every=1, tensorboard=True, plots=True, ema_decay=0.9)
    before = tr.evaluate()
    summary = tr.fit()
    after = tr.evaluate()
    assert after["loss"] < before["loss"] * 0.8
    for k in ("acc1", "acc5"):
        assert 0.0 <= after[k] <= 1.0
    assert after["acc5"] == 1.0  # 3 classes: top-5 is top-3

    s = json.loads((tmp_path / "summary.json").read_text())
    assert s == json.loads(json.dumps(summary))
    for k in ("val_acc", "best_val_acc", "val_acc_ema"):
        assert 0.0 <= s[k] <= 1.0
    assert s["best_val_acc"] >= s["val_acc"]
    assert s["epochs"] == 6 and s["steps"] == 48 and s["stopped"] == "completed"
    assert s["wall_s"] > 0 and s["train_img_per_s"] > 0
    assert s["skipped_files"] == 0 and s["nonfinite_skipped"] == 0

    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert len(train) == 48 and len(val) == 6
    assert train[-1]["loss"] < train[0]["loss"]
    assert all({"step", "epoch", "lr", "loss", "acc1", "img_per_s"} <= set(r) for r in train)
    assert "ema_acc1" in val[-1]
    for name in ("loss", "accuracy", "lr"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
    assert any((tmp_path / "tb").iterdir())
    # keep_last=2 plus best/
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best", "latest", "step_000040", "step_000048"]
    assert find_latest(tmp_path).name == "step_000048"


@pytest.mark.parametrize(("crash_step", "resume_from"), [(7, 4), (10, 8)], ids=["mid_epoch", "epoch_end"])
def test_resume_is_bitwise_identical(tmp_path, crash_step, resume_from):
    """An interrupted run resumed from its last checkpoint ends with exactly the same state."""
    full = make_trainer(tmp_path / "full", epochs=2, ema_decay=0.9)
    full.fit()

    run = tmp_path / "run"
    # 8 steps per epoch, a checkpoint every 4 steps: step 4 is mid-epoch, step 8 an epoch end.
    resumed = crash_and_resume(
        make_trainer, run, crash_step, latest=resume_from, epochs=2, ema_decay=0.9, ckpt_every_steps=4
    )

    assert full.step == 16
    assert_same_run(full, resumed, ema=True)
    assert full.scheduler.get_lr() == resumed.scheduler.get_lr()
    # The resumed run's log has no duplicate steps from the interrupted attempt.
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 16


def test_max_steps_shortens_schedule_and_stops(tmp_path):
    tr = make_trainer(tmp_path, epochs=5, max_steps=12)
    s = tr.fit()
    assert s["stopped"] == "max_steps" and s["steps"] == 12 and s["epochs"] == 1.5
    assert tr.total_steps == 12 and tr.scheduler.get_lr() == pytest.approx(1e-4)
    st = load_checkpoint(tmp_path)["trainer_state"]
    assert st["epoch"] == 1 and st["epoch_step"] == 4 and st["sampler"] == {"epoch": 1, "position": 32}


def test_killed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path, epochs=1)
    tr.fit()
    good = find_latest(tmp_path)
    assert good.name == "step_000008"
    real_write = ckpt_mod._write_tensors
    calls = []

    def dying_write(tensors, path):
        calls.append(path)
        if len(calls) == 2:  # model.safetensors written, objective.safetensors half-way
            path.write_bytes(b"\x00" * 10)
            raise KeyboardInterrupt("killed during checkpoint write")
        real_write(tensors, path)

    monkeypatch.setattr(ckpt_mod, "_write_tensors", dying_write)
    tr.step = 9
    with pytest.raises(KeyboardInterrupt):
        tr.save_checkpoint()
    root = tmp_path / "checkpoints"
    assert (root / ".tmp_step_000009").exists() and not (root / "step_000009").exists()
    assert find_latest(tmp_path) == good
    loaded = load_checkpoint(tmp_path)
    assert loaded["path"] == good
    assert_same_state(loaded["objective"], {k: v for k, v in tr.objective.state_dict().items()})

    monkeypatch.setattr(ckpt_mod, "_write_tensors", real_write)
    tr.save_checkpoint()
    assert not (root / ".tmp_step_000009").exists()
    assert find_latest(tmp_path).name == "step_000009"


class NanAt(Supervised):
    """Supervised whose loss becomes NaN on the given forward calls."""

    def __init__(self, nan_calls: set[int]):
        super().__init__(TinyNet(), num_classes=3)
        self.nan_calls = nan_calls
        self.calls = 0

    def forward(self, batch):
        out = super().forward(batch)
        self.calls += 1
        if self.calls in self.nan_calls:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nan_loss_stops_and_never_checkpoints_nan(tmp_path):
    tr = make_trainer(tmp_path, objective=NanAt({3}), ckpt_every_steps=1)
    with pytest.raises(NonFiniteLossError, match="optimizer step 3") as info:
        tr.fit()
    assert info.value.step == 3 and math.isnan(info.value.value)
    assert find_latest(tmp_path).name == "step_000002"
    for p in (tmp_path / "checkpoints").glob("step_*"):
        for sd in (load_checkpoint(p)["objective"],):
            assert all(torch.isfinite(v).all() for v in sd.values())

    # Weights that did turn non-finite are refused, and `latest` is untouched.
    sd = {k: v.clone() for k, v in tr.objective.state_dict().items()}
    sd["model.fc1.weight"][0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match="model.fc1.weight"):
        save_checkpoint(tmp_path / "checkpoints", 99, {"objective": sd}, {})
    assert find_latest(tmp_path).name == "step_000002"


def test_nonfinite_skip_counts_and_continues(tmp_path):
    tr = make_trainer(tmp_path, objective=NanAt({2, 5}), nonfinite="skip", epochs=1)
    summary = tr.fit()
    assert summary["nonfinite_skipped"] == 2 and summary["steps"] == 8
    assert all(torch.isfinite(p).all() for p in tr.objective.parameters())


def test_grad_accumulation_matches_larger_batch(tmp_path):
    common = dict(epochs=1, drop=0.0, shuffle=False, transform=None, sched={"name": "constant"})
    a = make_trainer(tmp_path / "a", batch_size=4, accum_steps=2, **common)
    b = make_trainer(tmp_path / "b", batch_size=8, accum_steps=1, **common)
    assert a.steps_per_epoch == b.steps_per_epoch == 8
    a.fit()
    b.fit()
    for (n, pa), pb in zip(a.objective.named_parameters(), b.objective.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=n)


def test_time_budget_stops_cleanly(tmp_path):
    tr = make_trainer(tmp_path, epochs=1000, time_budget="0.5s")
    s = tr.fit()
    assert s["stopped"] == "time_budget" and 0 < s["steps"] < 8000
    assert s["val_acc"] is not None
    assert find_latest(tmp_path).name == f"step_{s['steps']:06d}"


def test_resume_with_vitkit_data_sampler(tmp_path):
    """The data package's ResumableSampler (advance/state_dict with seed) resumes bitwise too."""
    from helpers import ToyDataset
    from torch.utils.data import DataLoader

    from vitkit.data.samplers import ResumableSampler

    def trainer(out, hooks=()):
        torch.manual_seed(0)
        sampler = ResumableSampler(64, seed=3)
        loader = DataLoader(ToyDataset(64), batch_size=8, sampler=sampler, drop_last=True)
        tr = make_trainer(out, epochs=2, ckpt_every_steps=4, hooks=hooks)
        tr.train_loader, tr.sampler = loader, sampler
        return tr

    full = trainer(tmp_path / "full")
    full.fit()
    with pytest.raises(Crash):
        trainer(tmp_path / "run", hooks=[CrashAt(7)]).fit()
    assert load_checkpoint(tmp_path / "run")["trainer_state"]["sampler"] == {"epoch": 0, "position": 32, "seed": 3}
    resumed = trainer(tmp_path / "run")
    resumed.fit(resume=True)
    assert_same_state(full.objective.state_dict(), resumed.objective.state_dict())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu(tmp_path, amp):
    tr = make_trainer(tmp_path, epochs=1, amp=amp, optim={"clip_grad": 1.0})
    s = tr.fit()
    assert s["amp"] == {"bf16": "bfloat16", "fp16": "float16"}[amp]
    assert math.isfinite(s["val_loss"]) and tr.scaler.is_enabled() == (amp == "fp16")
    assert all(p.dtype == torch.float32 for p in tr.objective.parameters())


def test_best_is_recovered_after_a_crash_between_renames(tmp_path):
    tr = make_trainer(tmp_path, epochs=1)
    tr.fit()
    root = tmp_path / "checkpoints"
    best_files = sorted(p.name for p in (root / "best").iterdir())
    # A crash after `best` was moved aside and before the new one was renamed in.
    (root / "best").rename(root / ".old_best")
    make_trainer(tmp_path, epochs=1)
    assert sorted(p.name for p in (root / "best").iterdir()) == best_files
    assert not (root / ".old_best").exists()


def test_streaming_loader_without_sampler_gets_set_epoch(tmp_path):
    from helpers import ToyDataset

    class Streaming:
        """An iterable loader with set_epoch and no index sampler (WebDataset-like)."""

        batch_size = 8

        def __init__(self):
            self.epochs, self.ds = [], ToyDataset(32)

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __len__(self):
            return 4

        def __iter__(self):
            for i in range(0, 32, 8):
                yield {k: torch.stack([self.ds[j][k] for j in range(i, i + 8)]) for k in ("image", "label")}

    loader = Streaming()
    tr = make_trainer(tmp_path, epochs=3)
    tr.train_loader, tr.sampler = loader, None
    tr.steps_per_epoch = 4
    tr.total_steps = 12
    tr.fit()
    assert loader.epochs == [0, 1, 2]


def test_device_cuda_without_cuda_is_a_training_error(tmp_path, monkeypatch):
    from vitkit.errors import TrainingError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrainingError, match="device=cuda but CUDA is not available"):
        make_trainer(tmp_path, device="cuda")


def test_engine_never_imports_objectives():
    """The engine defines the protocol objectives build on; importing them back would be a layering loop."""
    import ast
    from pathlib import Path

    import vitkit.engine

    found = []
    for path in Path(vitkit.engine.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and "objectives" in (node.module or ""):
                found.append(f"{path.name}:{node.lineno}")
            elif isinstance(node, ast.Import) and any("objectives" in a.name for a in node.names):
                found.append(f"{path.name}:{node.lineno}")
    assert not found, f"vitkit.engine imports vitkit.objectives at {found}"
