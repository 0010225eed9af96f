"""The installed `vitkit` command end to end, as a user meets it, on tiny data written here.

Each test runs real commands in subprocesses (the plan with its own choices, a SIGKILL and
``--resume``, an ``--init`` fine-tune, pretrain then probe for every method, explain and ONNX
export from a run directory) and checks what they leave on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import require_peer, run_vitkit, write_class_folder
from safetensors.torch import load_file

import vitkit
from vitkit.pretrain import METHODS

pytestmark = pytest.mark.e2e

# A quiet, single-process, CPU run: nothing here may depend on the machine's cores or a GPU.
QUIET = ["engine.tensorboard=false", "engine.plots=false", "data.num_workers=0", "engine.device=cpu"]
TINY = ["--model", "test_vit", "data.img_size=32", "data.batch_size=16", "engine.amp=none",
        "data.auto_augment=null", *QUIET]
RUN_FILES = ("config.yaml", "run.json", "summary.json", "metrics.jsonl", "model.safetensors")


def _assert_complete(run: Path) -> dict:
    for name in RUN_FILES:
        assert (run / name).is_file(), f"{name} missing from {run}: {sorted(p.name for p in run.iterdir())}"
    assert any((run / "checkpoints").iterdir()), "no checkpoint"
    return json.loads((run / "summary.json").read_text())


def _train_steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if r.get("kind") == "train"]


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory) -> Path:
    """One short supervised run on the built-in shapes (6 classes), shared by the tests that read a run."""
    run = tmp_path_factory.mktemp("e2e") / "shapes"
    run_vitkit("train", "--data", "shapes:96", "--out", run, *TINY, "engine.epochs=2", check=True)
    return run


def test_no_flag_train_plans_its_own_choices(tmp_path):
    """`vitkit train --data DIR` with only a time budget: the plan picks model, size, batch, lr and
    length, records each with its reason, and the run directory is complete."""
    write_class_folder(tmp_path / "data", per_class=20)
    run = tmp_path / "run"
    r = run_vitkit("train", "--data", tmp_path / "data", "--out", run, "engine.time_budget=20s", check=True)
    assert "plan (override any key with key=value):" in r.stdout
    summary = _assert_complete(run)
    info = json.loads((run / "run.json").read_text())
    plan = info["plan"]
    # Nothing but the budget was given, so the plan chose these; the budget stays the user's.
    assert {"model.name", "data.img_size", "data.batch_size", "optim.lr", "engine.epochs"} <= set(plan), sorted(plan)
    assert "engine.time_budget" not in plan
    assert all(v["reason"] for v in plan.values())
    assert info["model"] == plan["model.name"]["value"] and info["img_size"] == plan["data.img_size"]["value"]
    assert info["class_counts"] == {"a": 18, "b": 18, "c": 18} and info["num_classes"] == 3
    assert summary["steps"] > 0 and summary["stopped"] in ("time_budget", "completed")
    assert summary["wall_s"] < 60


def test_sigkill_then_resume_finishes_the_run_as_if_never_killed(tmp_path):
    args = ["--data", "shapes:96", *TINY, "engine.epochs=4", "engine.ckpt_every_steps=2", "engine.seed=3"]
    full = tmp_path / "full"
    run_vitkit("train", "--out", full, *args, check=True)

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vitkit.cli.main", "train", "--out", str(run), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list((run / "checkpoints").glob("step_*")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 2 minutes"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill ({proc.returncode}): {err[-2000:]}"
    assert not (run / "model.safetensors").exists()

    run_vitkit("train", "--resume", "--out", run, check=True)
    summary = _assert_complete(run)
    expected = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == expected["steps"] and summary["stopped"] == "completed"
    steps = _train_steps(run)
    assert steps == sorted(set(steps)), "the resumed log repeats steps of the killed attempt"
    ours, theirs = load_file(run / "model.safetensors"), load_file(full / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), f"{k} differs from the uninterrupted run"


def test_init_fine_tunes_from_a_previous_run(shapes_run, tmp_path):
    """`--init RUN/model.safetensors` on 3 classes: the 6-class head is replaced, the backbone is loaded."""
    init = load_file(shapes_run / "model.safetensors")
    write_class_folder(tmp_path / "data", per_class=20)
    run = tmp_path / "ft"
    run_vitkit("train", "--init", shapes_run / "model.safetensors", "--data", tmp_path / "data", "--out", run,
               *TINY, "engine.epochs=1", "optim.lr=1e-5", "peft.method=none", check=True)
    _assert_complete(run)
    tuned = load_file(run / "model.safetensors")
    assert init["head.weight"].shape[0] == 6 and tuned["head.weight"].shape[0] == 3
    assert tuned.keys() == init.keys()
    # A few steps at a tiny lr move the loaded backbone a little; a fresh init is far from it.
    torch.manual_seed(123)
    fresh = vitkit.create_model("test_vit", num_classes=3, img_size=32).state_dict()
    for key in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "pos_embed"):
        moved = (tuned[key] - init[key]).abs().max().item()
        apart = (fresh[key] - init[key]).abs().max().item()
        assert moved < 0.05 * apart, (key, moved, apart)


@pytest.mark.parametrize("method", METHODS)
def test_pretrain_then_probe(method, tmp_path):
    """Every SSL method pretrains from the CLI; the probe reads those weights and separates a tiny task."""
    run = tmp_path / method
    run_vitkit("pretrain", "--method", method, "--data", "shapes:192", "--out", run, *TINY,
               "engine.epochs=2", check=True)
    _assert_complete(run)
    pretrained = load_file(run / "model.safetensors")
    torch.manual_seed(0)
    fresh = vitkit.create_model("test_vit", img_size=32).state_dict()
    assert not torch.equal(pretrained["blocks.0.attn.qkv.weight"], fresh["blocks.0.attn.qkv.weight"])

    # The probe task: 3 classes told apart by colour and stripe direction, which any working
    # feature extractor separates (a couple of pretraining epochs do not yet make the shapes so).
    write_class_folder(tmp_path / "probe_data", per_class=40)
    r = run_vitkit("probe", run, "--data", tmp_path / "probe_data", "--workers", "0", "--out", tmp_path, check=True)
    assert "k-NN accuracy" in r.stdout
    result = json.loads((tmp_path / "probe_knn.json").read_text())
    assert Path(result["weights"]).resolve() == (run / "model.safetensors").resolve()
    assert result["num_classes"] == 3 and result["n_val"] >= 9
    assert result["knn_acc"] >= 0.75, result  # chance is 1/3


def test_explain_from_a_run_directory(shapes_run, tmp_path):
    from vitkit.data import ShapesDataset

    image = tmp_path / "star.png"
    ShapesDataset(n=4, split="val", img_size=64, seed=3).sample(3)["image"].save(image)
    r = run_vitkit("explain", shapes_run, image, "--method", "rollout", "--method", "pca", "--out",
                   tmp_path / "maps", check=True)
    assert "wrote" in r.stdout
    report = json.loads((tmp_path / "maps" / "report.json").read_text())
    classes = json.loads((shapes_run / "run.json").read_text())["classes"]
    (entry,) = report["images"]
    assert entry["top"][0]["label"] in classes
    assert set(entry["maps"]) == {"rollout", "pca"}
    for png in entry["maps"].values():
        assert (tmp_path / "maps" / png).stat().st_size > 0
    assert (tmp_path / "maps" / "index.html").is_file()


@pytest.mark.peer("onnx", "onnxscript", "onnxruntime")
def test_export_onnx_from_a_run_directory_matches_torch(shapes_run, tmp_path):
    ort = require_peer("onnxruntime")
    out = tmp_path / "model.onnx"
    r = run_vitkit("export", shapes_run, "--format", "onnx", "--out", out, "--json", check=True)
    assert json.loads(r.stdout)["ok"]
    # An independent check: onnxruntime on the file, against the run's weights rebuilt in torch.
    model = vitkit.create_model(str(shapes_run / "model.safetensors")).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x_in = x[:1] if session.get_inputs()[0].shape[0] == 1 else x
    (got,) = session.run(None, {session.get_inputs()[0].name: x_in.numpy()})
    with torch.no_grad():
        expected = model(x_in).numpy()
    assert got.shape == expected.shape == (len(x_in), 6)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
