"""`evaluate` / `predict` and their commands, on a tiny trained run and on weights files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.cli.main import main
from vitkit.config import load_config
from vitkit.data import DEFAULT_CLASSES, EvalTransform, Normalize, build_dataset, build_loader
from vitkit.evaluate import class_mapping, evaluate
from vitkit.predict import load_model, predict
from vitkit.rundir import RunDir
from vitkit.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of test_vit on the shapes data, two optimizer steps in full precision."""
    out = tmp_path_factory.mktemp("evaluate") / "run"
    cfg = load_config(None, [
        "model.name=test_vit", "data.path=shapes:256", "data.img_size=32", "engine.epochs=1", "engine.max_steps=2",
        "data.batch_size=32", "data.num_workers=0", "engine.tensorboard=false", "engine.plots=false",
        "engine.amp=none", "data.auto_augment=null", f"engine.out_dir={out}",
    ])
    train(cfg, verbose=False)
    return out


def _direct(weights, data: str) -> tuple[np.ndarray, int]:
    """Confusion matrix and top-5 hits, computed here without vitkit.evaluate."""
    model = vitkit.create_model(str(weights)).eval()
    card = model.card
    loader = build_loader(
        build_dataset(data, "val", seed=0, val_fraction=0.1), 256, train=False,
        transform=EvalTransform(card.input_size[1:], card.input_size[0], crop_pct=card.crop_pct),
    )
    norm = Normalize(card.mean, card.std)
    k = model.num_classes
    cm, top5 = np.zeros((k, k), dtype=np.int64), 0
    with torch.no_grad():
        for batch in loader:
            logits = model(norm(batch["image"]))
            for y, row in zip(batch["label"].tolist(), logits):
                cm[y, int(row.argmax())] += 1
                top5 += y in row.topk(5).indices.tolist()
    return cm, top5


def _image(path, value: int = 0):
    img = build_dataset("shapes:256", "val").load(value)[0]
    img.save(path)
    return path


def test_summary_is_written_once_with_what_train_adds(run):
    summary = RunDir(run).read_summary()
    assert summary["model"] == "test_vit" and summary["out_dir"] == str(run)
    assert summary["bad_files"] == [] and summary["skipped_files"] == 0 and summary["steps"] == 2
    assert not list(run.glob(".tmp_*"))  # written through a temporary file, renamed into place


def test_eval_command_matches_a_direct_computation(run, capsys):
    assert main(["eval", str(run), "--data", "shapes:256", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "eval.json").read_text())
    assert f"top-1 {result['top1']:.2%}" in out and "top-5" in out and "worst classes" in out
    cm, top5 = _direct(run / "model.safetensors", "shapes:256")
    assert result["n"] == cm.sum() == 100
    assert result["confusion_matrix"] == cm.tolist()
    assert result["top1"] == np.trace(cm) / 100 and result["top5"] == top5 / 100
    assert result["classes"] == list(DEFAULT_CLASSES)
    for i, name in enumerate(DEFAULT_CLASSES):
        assert result["per_class"][name] == cm[i, i] / cm[i].sum()
    # The trainer's own validation pass saw the same images with the same weights (in batches
    # of 64, so one near-tie may round the other way).
    summary = json.loads((run / "summary.json").read_text())
    assert abs(result["top1"] - summary["val_acc"]) <= 0.01
    with Image.open(run / "confusion_matrix.png") as png:
        assert png.width > 400 and png.height > 400


def test_evaluate_without_final_weights_uses_the_best_checkpoint(run, tmp_path):
    partial = tmp_path / "run"
    shutil.copytree(run, partial)
    (partial / "model.safetensors").unlink()
    # One epoch: the best checkpoint holds the final weights, rebuilt here from run.json.
    full = evaluate(run, "shapes:256", num_workers=0, out_dir=tmp_path / "full")
    result = evaluate(partial, "shapes:256", num_workers=0)
    assert result["weights"].endswith("best/model.safetensors")
    assert (partial / "eval.json").is_file() and (partial / "confusion_matrix.png").is_file()
    assert result["confusion_matrix"] == full["confusion_matrix"]
    run_eval = (partial / "eval.json").read_bytes()
    step = partial / "checkpoints" / "step_000002"
    ckpt = evaluate(step, "shapes:256", num_workers=0)
    assert ckpt["confusion_matrix"] == full["confusion_matrix"]
    # Scoring a checkpoint writes next to it: the run's own eval.json stays as it was.
    assert (step / "eval.json").is_file() and (partial / "eval.json").read_bytes() == run_eval
    with pytest.raises(ValueError, match="engine.ema_decay"):
        evaluate(partial, "shapes:256", use_ema=True)


def test_predict_command_json(run, tmp_path, capsys):
    img = _image(tmp_path / "img.png")
    assert main(["predict", str(run), str(img), "--json", "--topk", "6"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["path"] == str(img)
    probs = [t["prob"] for t in result["top"]]
    assert abs(sum(probs) - 1) < 1e-5 and probs == sorted(probs, reverse=True)
    assert {t["label"] for t in result["top"]} == set(DEFAULT_CLASSES)
    # The same answer from the library, for a path and for a PIL image.
    with Image.open(img) as pil:
        lib = predict(run / "model.safetensors", [str(img), pil.convert("RGB")], topk=2)
    assert [t["label"] for t in lib[0]["top"]] == [t["label"] for t in result["top"][:2]]
    assert lib[1]["path"] is None and lib[1]["top"] == lib[0]["top"]


def test_predict_bad_images_exit_2_naming_the_file(run, tmp_path, capsys):
    missing = tmp_path / "missing.png"
    assert main(["predict", str(run), str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert main(["predict", str(run), str(_image(tmp_path / "ok.png")), str(broken)]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "not an image" in err
    assert main(["predict", str(tmp_path / "no_run"), str(broken)]) == 2
    assert "no_run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="topk"):
        predict(run, [str(broken)], topk=0)


def _folder(root, classes, n=2):
    """A class-folder tree (train/ and val/) of plain 32 px images."""
    for split in ("train", "val"):
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for j in range(n):
                Image.new("RGB", (32, 32), (40 * i, 30 * j, 90)).save(root / split / name / f"{j}.png")
    return str(root)


def test_evaluate_reconciles_classes_by_name_or_says_why_not(run, tmp_path):
    weights = tmp_path / "w" / "model.safetensors"
    weights.parent.mkdir()
    shutil.copy(run / "model.safetensors", weights)
    # A subset of the model's classes in another order: mapped by name.
    subset = evaluate(weights, _folder(tmp_path / "subset", ["star", "circle"]), num_workers=0)
    assert subset["classes_matched_by_name"] and set(subset["per_class"]) == {"star", "circle"}
    assert subset["n"] == 4 and sum(map(sum, subset["confusion_matrix"])) == 4
    assert (weights.parent / "eval.json").is_file()
    with pytest.raises(ValueError, match=r"not among the model's 6 labels.*'cat'"):
        evaluate(weights, _folder(tmp_path / "pets", ["cat", "dog"]), num_workers=0)

    unnamed = vitkit.create_model("test_vit", num_classes=3)
    vitkit.save_weights(unnamed, tmp_path / "unnamed.safetensors")
    with pytest.raises(ValueError, match="the data has 2 classes but the model predicts 3"):
        evaluate(tmp_path / "unnamed.safetensors", _folder(tmp_path / "two", ["a", "b"]), num_workers=0)
    result = evaluate(tmp_path / "unnamed.safetensors", _folder(tmp_path / "three", ["a", "b", "c"]), num_workers=0)
    assert result["classes"] == ["a", "b", "c"] and result["n"] == 6


def test_class_mapping_rules():
    assert class_mapping(["a", "b"], ("a", "b"), 2) is None
    assert class_mapping(["b", "a"], ("a", "b", "c"), 3) == [1, 0]
    assert class_mapping(["0", "1"], ("a", "b"), 2) is None  # index names on one side: by position
    with pytest.raises(ValueError, match="3 classes but the model predicts 2"):
        class_mapping(["0", "1", "2"], ("a", "b"), 2)


def test_load_model_needs_vitkit_weights_or_a_run(tmp_path):
    from safetensors.torch import save_file

    save_file(vitkit.create_model("test_vit").state_dict(), tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="not written by save_weights"):
        load_model(tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="not a vitkit run directory"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="single weights file"):
        load_model(tmp_path / "bare.safetensors", use_ema=True)
