"""`vitkit pretrain` and `vitkit probe` as a user meets them: a first run on the built-in shapes."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from helpers import assert_user_error
from helpers import run_vitkit as vitkit

from vitkit.cli.main import main
from vitkit.pretrain import pretrain_overrides

TINY = [
    "--model", "test_vit", "--data", "shapes:128", "data.img_size=32", "engine.epochs=1", "data.batch_size=32",
    "data.num_workers=0", "engine.tensorboard=false", "engine.plots=false", "engine.amp=none",
]


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrain") / "mae"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["pretrain", "--method", "mae", "--out", str(run), *TINY, "objective.decoder_dim=32",
                     "objective.decoder_depth=1", "objective.decoder_heads=2"]) == 0
    return run, out.getvalue()


def test_pretrain_mae_writes_encoder_figure_and_knn(mae_run):
    run, stdout = mae_run
    for name in ("config.yaml", "run.json", "summary.json", "model.safetensors", "reconstruction.png"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["objective"] == "mae" and 0.0 <= summary["val_knn_acc"] <= 1.0
    assert "k-NN accuracy" in stdout and f"vitkit probe {run}" in stdout


def test_probe_knn_and_linear_write_json(mae_run, tmp_path):
    run, _ = mae_run
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["probe", str(run), "--data", "shapes:128", "--workers", "0", "--out", str(tmp_path)]) == 0
        assert main(["probe", str(run / "model.safetensors"), "--data", "shapes:128", "--method", "linear",
                     "--epochs", "3", "--workers", "0", "--out", str(tmp_path)]) == 0
    knn = json.loads((tmp_path / "probe_knn.json").read_text())
    assert {"knn_acc_10", "knn_acc_20", "knn_acc_200"} <= set(knn) and knn["num_classes"] == 6
    assert knn["knn_acc"] == knn["knn_acc_20"] and all(0 <= knn[f"knn_acc_{k}"] <= 1 for k in (10, 20, 200))
    lin = json.loads((tmp_path / "probe_linear.json").read_text())
    assert 0 <= lin["linear_acc"] <= 1 and lin["linear_config"]["epochs"] == 3
    assert "k-NN accuracy" in out.getvalue() and "linear probe accuracy" in out.getvalue()


def test_pretrain_dino_multicrop_run(tmp_path):
    run = tmp_path / "dino"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["pretrain", "--method", "dino", "--out", str(run), *TINY, "objective.out_dim=64",
                     "objective.hidden_dim=32", "objective.bottleneck_dim=16", "objective.local_crops=2"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and "val_knn_acc" in summary
    assert (run / "model.safetensors").is_file()


def test_pretrain_defaults_and_user_overrides():
    o = pretrain_overrides("mae", ["optim.lr=0.1"])
    assert "objective.name=mae" in o and "optim.lr=0.1" in o and "optim.lr=0.0003" not in o
    assert "data.mixup=0.0" in o and "model.args.conv_stem=false" in o
    assert "model.args.conv_stem=false" not in pretrain_overrides("mae", ["model.name=test_vit"])


def test_bad_input_is_a_clear_error_without_traceback(tmp_path):
    assert_user_error(vitkit("probe", tmp_path / "nothing", "--data", "shapes"), "no such file or folder")
    assert_user_error(vitkit("pretrain", "--method", "dino", "--show-config", "objective.bogus=1"),
                      "bogus", "objective.out_dim")
