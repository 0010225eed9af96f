"""`vitkit train`: run dir contents, config printing and errors, resume."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import yaml

from vitkit.cli.main import main
from vitkit.errors import ConfigError, RunDirError
from vitkit.rundir import check_resume_config, prepare_out_dir, saved_config, schedule_changes

# One tiny epoch: 256 shapes images, 8 steps of 32 at 32 px, in full precision.
TINY = [
    "--model", "test_vit", "--data", "shapes:256", "data.img_size=32", "engine.epochs=1", "data.batch_size=32",
    "data.num_workers=0", "engine.tensorboard=false", "engine.plots=false", "engine.amp=none",
    "data.auto_augment=null",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run dir, stdout) of one `vitkit train` call."""
    run = tmp_path_factory.mktemp("cli_train") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", *TINY, "--out", str(run)]) == 0
    return run, out.getvalue()


def test_train_writes_run_dir_and_prints_next_steps(trained):
    run, stdout = trained
    for name in ("config.yaml", "run.json", "summary.json", "model.safetensors", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000008"
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["val_acc"] <= 1.0 and summary["steps"] == 8
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["name"] == "test_vit" and cfg["data"]["path"] == "shapes:256"
    assert cfg["engine"]["out_dir"] == str(run)
    assert json.loads((run / "run.json").read_text())["classes"][0] == "circle"
    assert f"val_acc {summary['val_acc']:.2%}" in stdout and "best_val_acc" in stdout
    assert f"vitkit eval {run} --data shapes:256" in stdout and f"vitkit predict {run} IMAGE" in stdout


def test_show_config_prints_yaml_and_trains_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--show-config", "--model", "test_vit", "--out", "r", "engine.epochs=3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["engine"]["epochs"] == 3 and cfg["model"]["name"] == "test_vit" and cfg["engine"]["out_dir"] == "r"
    assert cfg["optim"]["lr"] > 0 and "data" in cfg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "override, expect",
    [
        ("engine.epoch=3", "engine.epoch"),  # unknown key
        ("engine.epochs=abc", "engine.epochs"),  # wrong type
        ("data.batch_size=0", "data.batch_size"),  # fails validation
        ("epochs", "key=value"),  # not an override
        ("engine.nonfinite=ignore", "engine.nonfinite must be one of stop, skip"),  # the engine would refuse it late
        ("schedule.name=cos", "schedule.name"),
        ("data.auto_augment=rand-m99", "data.auto_augment"),
        ("engine.device=gpu", "engine.device"),
    ],
)
def test_bad_override_exits_2_naming_the_key(override, expect, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "test_vit", override]) == 2
    err = capsys.readouterr().err
    assert expect in err and err.startswith("vitkit train: error:")
    assert list(tmp_path.iterdir()) == []


def test_resume_errors(tmp_path, capsys):
    assert main(["train", "--resume"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2  # a folder that is no run
    assert "run directory" in capsys.readouterr().err


def test_resume_continues_the_run_from_its_config(trained, tmp_path, capsys):
    first, _ = trained
    run = tmp_path / "run"
    shutil.copytree(first, run)
    # Only the new epoch count is given: model, data and batch size come from the run's config.yaml.
    assert main(["train", "--resume", "--out", str(run), "engine.epochs=2"]) == 2  # the schedule would jump
    assert "engine.epochs: 1 -> 2" in capsys.readouterr().err
    assert main(["train", "--resume", "--reschedule", "--out", str(run), "engine.epochs=2"]) == 0
    assert "resumed from" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["epochs"] == 2.0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000016"
    assert yaml.safe_load((run / "config.yaml").read_text())["engine"]["epochs"] == 2


def test_resume_value_forms(trained, tmp_path, capsys):
    """`--resume RUN` and `--resume CKPT` name what to continue; `--resume key=value` is an override."""
    first, _ = trained
    run = tmp_path / "run"
    shutil.copytree(first, run)
    ckpt = run / "checkpoints" / "step_000008"
    assert main(["train", "--resume", str(ckpt), "engine.epochs=1", "--show-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["engine"]["out_dir"] == str(run)
    assert main(["train", "--resume", str(run), "--show-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["name"] == "test_vit"
    assert main(["train", "--out", str(run), "--resume", "engine.eval_every=5", "--show-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["engine"]["eval_every"] == 5
    assert main(["train", "--resume", "--out", str(run), "--recipe", "x"]) == 2
    assert "--recipe" in capsys.readouterr().err
    # No run in --out yet: --resume starts one from the recipe, flags and overrides.
    assert main(["train", "--resume", "--out", str(tmp_path / "new"), "--model", "test_vit", "--show-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["name"] == "test_vit"


def test_schedule_check_names_changed_keys():
    saved = {"engine": {"epochs": 10, "eval_every": 1}, "data": {"batch_size": 64}, "schedule": {"min_lr": 1e-5},
             "optim": {"lr": 1e-3, "weight_decay": 0.05}}
    new = {"engine": {"epochs": 20, "eval_every": 2}, "data": {"batch_size": 64}, "schedule": {"min_lr": 0.0},
           "optim": {"lr": 1e-3, "weight_decay": 0.1}}
    assert schedule_changes(saved, new) == ["engine.epochs: 10 -> 20", "schedule.min_lr: 1e-05 -> 0.0"]
    with pytest.raises(ConfigError, match=r"engine.epochs: 10 -> 20; schedule.min_lr.*--reschedule"):
        check_resume_config(saved, new)
    assert len(check_resume_config(saved, new, reschedule=True)) == 2
    same = {**new, "engine": {"epochs": 10, "eval_every": 2}, "schedule": {"min_lr": 1e-5}}
    assert check_resume_config(saved, same) == []  # eval_every and weight decay do not move the lr


def test_out_with_a_run_needs_resume_or_force(trained, tmp_path, capsys):
    first, _ = trained
    run = tmp_path / "run"
    shutil.copytree(first, run)
    (run / "notes.md").write_text("mine")
    assert main(["train", *TINY, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--force" in err
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len((first / "metrics.jsonl").read_text().splitlines())
    assert main(["train", *TINY, "--out", str(run), "--force"]) == 0
    assert "--force: deleted the previous run's config.yaml" in capsys.readouterr().out
    # Only the new run's records: the old metrics are gone, the user's own file stays.
    n_new = len((run / "metrics.jsonl").read_text().splitlines())
    assert n_new == len((first / "metrics.jsonl").read_text().splitlines()) > 0
    assert (run / "notes.md").read_text() == "mine"


def test_saved_config_of_what_resume_continues(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000004").mkdir(parents=True)
    (run / "config.yaml").write_text("engine: {}\n")
    assert saved_config(True, run) == saved_config(str(run / "checkpoints" / "step_000004"), tmp_path / "new") \
        == run / "config.yaml"
    assert saved_config(False, run) is None and saved_config(True, tmp_path / "fresh") is None


def test_force_removes_every_run_file_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "cache").mkdir()
    (run / "cache" / "store-0123.u8").write_bytes(b"x")  # a decode-once store: it goes with the run
    (run / "config.yaml").write_text("model: {}\n")
    (run / "notes.txt").write_text("the user's own file")
    removed = prepare_out_dir(run, force=True)
    assert sorted(removed) == ["cache", "checkpoints", "config.yaml"]
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_prepare_out_dir_unwritable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunDirError, match="cannot write the run directory"):
        prepare_out_dir(blocker / "run")
