"""The installed `vitkit` command on bad input: exit 2, one short message, never a traceback.

Every test runs the real command in a subprocess (PYTHONPATH makes it this checkout), as a
user would, so what is asserted is exactly what they see on the terminal.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
import tarfile

import pytest
import torch
from helpers import assert_user_error
from helpers import run_vitkit as vitkit
from PIL import Image

# One tiny epoch on the CPU; broken-file thresholds are the only thing the tests vary.
TINY = [
    "--model", "test_vit", "data.img_size=32", "engine.epochs=1", "data.batch_size=8", "engine.tensorboard=false",
    "engine.plots=false", "engine.amp=none", "data.num_workers=0", "data.auto_augment=null", "engine.device=cpu",
]


def _jpeg(k: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (k * 37 % 256, 80, 160)).save(buf, "JPEG")
    return buf.getvalue()


_BROKEN = [b"", b"not an image at all\n", None]  # None: a truncated JPEG


def _folder(root, n_good: int, n_bad: int, clutter: bool = False):
    """Two class folders of good JPEGs plus ``n_bad`` broken ``.jpg`` files; returns the broken names."""
    bad = []
    for k in range(n_good):
        d = root / ("a" if k % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{k:03d}.jpg").write_bytes(_jpeg(k))
    for k in range(n_bad):
        data = _BROKEN[k % 3]
        path = root / ("a" if k % 2 else "b") / f"broken{k}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(k)[:60] if data is None else data)
        bad.append(str(path))
    if clutter:
        for c in ("a", "b"):
            (root / c / f"._{c}000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
            (root / c / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
            (root / c / "notes.txt").write_text("collected 2024\n")
        (root / "__MACOSX" / "a").mkdir(parents=True)
        (root / "__MACOSX" / "a" / "._001.jpg").write_bytes(b"\x00\x05\x16\x07")
    return bad


def _listed_once(names: list[str], text: str) -> None:
    for name in names:
        assert text.count(name) == 1, (name, text)


# ---- data --------------------------------------------------------------------------------------------


def test_missing_dataset(tmp_path):
    assert_user_error(vitkit("train", "--data", tmp_path / "nope", "--out", tmp_path / "run", *TINY),
                      "no such file or folder", "nope")
    assert not (tmp_path / "run").exists()


def test_corrupt_tar_gz(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for k in range(20):
            info = tarfile.TarInfo(f"ds/{'ab'[k % 2]}/{k}.jpg")
            data = _jpeg(k) * 4
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "ds.tar.gz").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert_user_error(vitkit("train", "--data", tmp_path / "ds.tar.gz", "--out", tmp_path / "run", *TINY),
                      "truncated or corrupt", "ds.tar.gz")


def test_folder_with_10_percent_broken_files(tmp_path):
    bad = _folder(tmp_path / "ds", n_good=54, n_bad=6)
    # Over the default threshold (5%): refused before training, saying how to go on.
    err = assert_user_error(vitkit("train", "--data", tmp_path / "ds", "--out", tmp_path / "strict", *TINY),
                            "6 of 60 image files", "data.max_bad_fraction")
    assert "broken0.jpg" in err
    # With the threshold raised it trains, without ever meeting the broken files.
    r = vitkit("train", "--data", tmp_path / "ds", "--out", tmp_path / "run", *TINY, "data.max_bad_fraction=0.2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr
    listing = (tmp_path / "run" / "bad_files.txt").read_text()
    _listed_once(bad, listing)
    assert len(listing.splitlines()) == 6
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_files"] == 6 and len(summary["bad_files"]) == 6
    assert "checked 60 image files" in r.stdout and "left out 6 broken image files" in r.stdout


def test_folder_of_only_broken_files(tmp_path):
    _folder(tmp_path / "ds", n_good=0, n_bad=6)
    assert_user_error(vitkit("train", "--data", tmp_path / "ds", "--out", tmp_path / "run", *TINY),
                      "none of the 6 image files can be read")


def test_cluttered_folder_trains_and_lists_each_broken_file_once(tmp_path):
    bad = _folder(tmp_path / "ds", n_good=72, n_bad=3, clutter=True)  # 4% broken
    r = vitkit("train", "--data", tmp_path / "ds", "--out", tmp_path / "run", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr
    run = tmp_path / "run"
    _listed_once(bad, (run / "bad_files.txt").read_text())
    summary = json.loads((run / "summary.json").read_text())
    _listed_once(bad, "\n".join(summary["bad_files"]))
    assert summary["skipped_files"] == 3 and summary["steps"] > 0
    info = json.loads((run / "run.json").read_text())
    assert info["classes"] == ["a", "b"] and info["n_train"] + info["n_val"] == 72  # clutter is not data; broken files are left out of the split
    assert "checked 75 image files" in r.stdout


def test_malicious_pickle_in_cifar_batch(tmp_path):
    marker = tmp_path / "payload_ran"
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()

    class Payload:  # a plain pickle.load of this calls os.system
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}))
    assert_user_error(vitkit("train", "--data", tmp_path, "--out", tmp_path / "run", *TINY),
                      "not a CIFAR python batch", "refused to load")
    assert not marker.exists()


# ---- weights -----------------------------------------------------------------------------------------


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": garbage")
    img = tmp_path / "x.jpg"
    img.write_bytes(_jpeg(1))
    assert_user_error(vitkit("predict", tmp_path / "model.safetensors", img), "truncated or corrupt", "model.safetensors")


def test_truncated_pth(tmp_path):
    from vitkit import create_model

    torch.save(create_model("test_vit", img_size=32).state_dict(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "w.pth").write_bytes(data[: len(data) // 2])
    assert_user_error(
        vitkit("train", "--data", "shapes:64", "--init", tmp_path / "w.pth", "--out", tmp_path / "run", *TINY),
        "truncated or corrupt", "w.pth",
    )


def test_missing_owner_name_path_offline(tmp_path):
    assert_user_error(
        vitkit("train", "--data", "shapes:64", "--init", "myorg/vit-weights", "--out", tmp_path / "run", *TINY),
        "no such file or folder", "myorg/vit-weights",
    )
    img = tmp_path / "x.jpg"
    img.write_bytes(_jpeg(1))
    assert_user_error(vitkit("predict", "runs/my-run", img, cwd=tmp_path), "no such file or folder", "runs/my-run")


def test_too_few_images_for_one_batch(tmp_path):
    _folder(tmp_path / "ds", n_good=12, n_bad=0)
    assert_user_error(vitkit("train", "--data", tmp_path / "ds", "--out", tmp_path / "run", *TINY, "data.batch_size=64"),
                      "data.batch_size=64")


# ---- run directories -----------------------------------------------------------------------------------


def test_unwritable_out(tmp_path):
    blocked = tmp_path / "ro"
    blocked.mkdir()
    blocked.chmod(0o500)
    try:
        if os.access(blocked, os.W_OK):  # root ignores the mode: block with a regular file instead
            (tmp_path / "file").write_text("x")
            out = tmp_path / "file" / "run"
        else:
            out = blocked / "run"
        assert_user_error(vitkit("train", "--data", "shapes:64", "--out", out, *TINY), "cannot write the run directory")
    finally:
        blocked.chmod(0o700)


def test_out_reused_without_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("engine:\n  epochs: 1\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert_user_error(vitkit("train", "--data", "shapes:64", "--out", run, *TINY), "already holds a run", "--resume",
                      "--force")
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


# ---- training failures (the engine raises TrainingError for these) ------------


def test_nan_loss(tmp_path):
    # lr 1e30 makes the weights overflow after the first updates, so the loss turns NaN within a few steps.
    assert_user_error(vitkit("train", "--data", "shapes:64", "--out", tmp_path / "run", *TINY, "optim.lr=1e30"),
                      "non-finite loss", "optim.lr")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda(tmp_path):
    assert_user_error(vitkit("train", "--data", "shapes:64", "--out", tmp_path / "run", *TINY, "engine.device=cuda"),
                      "CUDA")


# ---- the CLI's own contract ------------------------------------------------------------------------------


def test_debug_shows_the_traceback(tmp_path):
    r = vitkit("--debug", "train", "--data", tmp_path / "nope", *TINY)
    assert r.returncode == 1 and "Traceback" in r.stderr and "PathNotFoundError" in r.stderr
    # Bad model arguments from the config are a user error too.
    assert_user_error(vitkit("train", "--data", "shapes:64", "--out", tmp_path / "run", *TINY, "model.args.depth=x"),
                      "model.args={'depth': 'x'}")


# ---- in-process: paths the subprocess tests cannot reach -------------------------------------------------


def test_keyboard_interrupt_exits_130_with_one_line(monkeypatch, capsys):
    import vitkit.cli.models as models_cmd
    from vitkit.cli.main import main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(models_cmd, "run_models", interrupted)
    assert main(["models"]) == 130
    assert capsys.readouterr().err.strip() == "vitkit models: interrupted"


def test_a_bug_says_so_and_leaves_its_traceback_in_a_log(monkeypatch, capsys, tmp_path):
    import vitkit.cli.models as models_cmd
    from vitkit.cli.main import main

    def buggy(args):
        raise RuntimeError("index out of whack")

    monkeypatch.setattr(models_cmd, "run_models", buggy)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vitkit models: internal error (a bug): RuntimeError: index out of whack; the traceback is in ")
    assert "please report it" in err and "Traceback" not in err
    log = err.split("the traceback is in ")[1].split(";")[0]
    assert log.startswith(str(tmp_path)) and "index out of whack" in open(log).read()


def test_hub_http_error_is_a_weights_error(monkeypatch):
    """An HTTP failure from the hub names the id and what to check (huggingface_hub faked: no network here)."""
    import types

    from vitkit.errors import WeightsError
    from vitkit.weights_io import read_state_dict

    class HTTPError(OSError):
        pass

    class EntryNotFoundError(Exception):
        pass

    def download(repo_id, filename):
        raise HTTPError(f"401 Client Error: Unauthorized for url: https://huggingface.co/{repo_id}/{filename}")

    hub = types.ModuleType("huggingface_hub")
    hub.constants = types.SimpleNamespace(HF_HUB_OFFLINE=False, HF_HUB_CACHE="/tmp/none")
    hub.hf_hub_download = download
    utils = types.ModuleType("huggingface_hub.utils")
    utils.EntryNotFoundError = EntryNotFoundError
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    monkeypatch.setitem(sys.modules, "huggingface_hub.utils", utils)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(WeightsError, match=r"'someone/private-vit'.*401.*Check the id.*network.*HF_HUB_OFFLINE"):
        read_state_dict("someone/private-vit")


def test_which_names_go_to_the_hub():
    from vitkit.weights_io import is_hub_id

    assert is_hub_id("facebook/dinov2-small") and is_hub_id("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")
    for local in ("./owner/name", "/owner/name", "owner/name.safetensors", "runs/model.pth", "a/b/c", "~/x/y"):
        assert not is_hub_id(local), local


def test_create_model_with_a_missing_file_says_no_such_file():
    from vitkit import create_model
    from vitkit.errors import PathNotFoundError

    with pytest.raises(PathNotFoundError, match="no such file or folder: 'missing.safetensors'"):
        create_model("missing.safetensors")
    with pytest.raises(PathNotFoundError, match="no such file"):
        create_model("runs/x/model.safetensors")
