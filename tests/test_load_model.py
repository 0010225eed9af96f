"""`RunDir` (the run-directory layout) and `load_model` (every kind of model source), on hand-made run dirs."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

import vitkit
import vitkit.predict
from vitkit.cli.resume import resume_plan
from vitkit.errors import ConfigError, PathNotFoundError, RunDirError, WeightsError
from vitkit.rundir import RunDir
from vitkit.source import ArchitectureNeededError, load_model

CLASSES = ["a", "b", "c"]


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _checkpoint(root, name: str, model, ema=None):
    d = root / name
    d.mkdir(parents=True)
    save_file(_tensors(model), str(d / "model.safetensors"))
    if ema is not None:
        save_file(_tensors(ema), str(d / "ema.safetensors"))
    torch.save({"step": 1}, d / "trainer_state.pt")
    return d


@pytest.fixture
def run(tmp_path):
    """A run as training leaves it mid-way: run.json, config.yaml, two step checkpoints (the latter with
    EMA weights), ``latest`` and ``best/``; no final weights. Each weights file holds a different model."""
    out = tmp_path / "run"
    out.mkdir()
    info = {"model": "test_vit", "num_classes": 3, "img_size": 32, "in_chans": 3, "classes": CLASSES,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (out / "run.json").write_text(json.dumps(info))
    (out / "config.yaml").write_text("data:\n  val_fraction: 0.2\n  crop_pct: 1.0\nengine:\n  seed: 7\n")
    models = {k: vitkit.create_model("test_vit", num_classes=3, img_size=32) for k in ("s1", "s2", "ema", "best")}
    ck = out / "checkpoints"
    _checkpoint(ck, "step_000001", models["s1"])
    _checkpoint(ck, "step_000002", models["s2"], ema=models["ema"])
    _checkpoint(ck, "best", models["best"])
    (ck / "latest").write_text("step_000002\n")
    return out, models


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_rundir_names_and_checkpoints(run):
    out, _ = run
    rd = RunDir(out)
    assert rd.is_run() and rd.holds_run() and rd.read_config()["engine"]["seed"] == 7
    assert rd.run_json == out / "run.json" and rd.final_weights == out / "model.safetensors"
    assert rd.checkpoint("latest") == out / "checkpoints" / "step_000002"
    assert rd.checkpoint("best") == out / "checkpoints" / "best" and rd.checkpoint(1).name == "step_000001"
    assert rd.checkpoint(5) is None and [p.name for p in rd.list_checkpoints()] == ["step_000001", "step_000002"]
    # A stale pointer falls back to the newest complete step directory.
    (out / "checkpoints" / "latest").write_text("step_000009\n")
    assert rd.checkpoint("latest").name == "step_000002"
    # Unfinished: best/ stands for the run, EMA from it; finished: the final weights, EMA from the latest step.
    assert rd.weights() == out / "checkpoints" / "best" / "model.safetensors"
    with pytest.raises(RunDirError, match="without engine.ema_decay"):
        rd.weights(ema=True)
    (out / "model.safetensors").write_bytes(b"")
    assert rd.weights() == out / "model.safetensors"
    assert rd.weights(ema=True) == out / "checkpoints" / "step_000002" / "ema.safetensors"
    assert RunDir.of_checkpoint(out / "checkpoints" / "best" / "model.safetensors").path == out
    with pytest.raises(ConfigError, match="'latest', 'best' or a step number"):
        rd.checkpoint("newest")
    empty = RunDir(out.parent / "empty")
    assert not empty.holds_run() and empty.read_config() == {} and empty.checkpoint() is None
    with pytest.raises(RunDirError, match="no run.json"):
        empty.read_run_info()


def test_load_model_from_every_run_dir_source(run):
    out, models = run
    lm = load_model(out, device="cpu")
    assert _same(lm.model, models["best"]) and lm.labels == tuple(CLASSES) and lm.run_dir == out
    assert lm.settings == {"val_fraction": 0.2, "seed": 7} and lm.config["data"]["crop_pct"] == 1.0
    assert tuple(lm.normalize.mean) == (0.5,) * 3 and not lm.model.training
    step = out / "checkpoints" / "step_000001"
    assert _same(load_model(step, device="cpu").model, models["s1"])
    assert _same(load_model(step / "model.safetensors", device="cpu").model, models["s1"])
    assert load_model(step, device="cpu").labels == tuple(CLASSES)  # the run above the checkpoint
    assert _same(load_model(out / "checkpoints" / "step_000002", use_ema=True, device="cpu").model, models["ema"])
    with pytest.raises(ConfigError, match="single weights file"):
        load_model(step / "model.safetensors", use_ema=True)
    # Finished: the final weights, self-describing (save_weights) and carrying the class names.
    final = vitkit.create_model("test_vit", num_classes=3, img_size=32)
    vitkit.save_weights(final, out / "model.safetensors")
    assert _same(load_model(out, device="cpu").model, final)
    assert _same(load_model(out, use_ema=True, device="cpu").model, models["ema"])


def test_load_model_from_files_names_and_hub_ids(tmp_path):
    model = vitkit.create_model("test_vit", num_classes=4)
    bare = tmp_path / "bare.safetensors"
    save_file(_tensors(model), str(bare))
    with pytest.raises(ArchitectureNeededError, match="not written by save_weights") as e:
        load_model(bare)
    assert e.value.what == "is a weights file without vitkit metadata" and isinstance(e.value, WeightsError)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    for path in (bare, tmp_path / "w.pth"):
        lm = load_model(path, model_name="test_vit", num_classes=4, device="cpu")
        assert _same(lm.model, model) and lm.labels == () and lm.run_dir is None
    named = load_model("test_vit", pretrained=False, img_size=48, device="cpu")
    assert named.weights is None and named.transform.size == (48, 48)
    with pytest.raises(ConfigError, match="no published weights"):
        load_model("test_vit")
    with pytest.raises(ArchitectureNeededError, match="no such file or folder: 'someone/unknown'"):
        load_model("someone/unknown")
    with pytest.raises(PathNotFoundError, match="no such file or folder"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(RunDirError, match="not a vitkit run directory"):
        load_model(tmp_path)
    assert vitkit.load_model is load_model and vitkit.predict.load_model is load_model


def _args(**kw):
    return argparse.Namespace(**{"resume": None, "out": None, "overrides": [], **kw})


def test_resume_plan(run, tmp_path):
    out, _ = run
    assert resume_plan(_args(out="x")) == (None, False, "x")
    base, resume, where = resume_plan(_args(resume=True, out=str(out)))
    assert base.path == out and resume is True and where == str(out)
    assert resume_plan(_args(resume=True, out=str(tmp_path / "new"))) == (None, True, str(tmp_path / "new"))
    step = out / "checkpoints" / "step_000001"
    base, resume, where = resume_plan(_args(resume=str(step)))
    assert base.path == out and resume == str(step) and where == str(out)
    args = _args(resume="engine.epochs=3", out=str(out))
    assert resume_plan(args)[1] is True and args.overrides == ["engine.epochs=3"]
    with pytest.raises(ConfigError, match="--out RUN_DIR"):
        resume_plan(_args(resume=True))
    with pytest.raises(PathNotFoundError):
        resume_plan(_args(resume=str(tmp_path / "nope")))
    with pytest.raises(RunDirError, match="expected a run directory"):
        resume_plan(_args(resume=str(tmp_path)))
