"""The dense commands end to end: `vitkit train --data <CamVid-style folder>` with no other flag than a
short budget, then `vitkit eval` and `vitkit predict` on the run; depth with `--task depth`; bad input
as one clear line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_user_error, run_vitkit, write_class_folder
from PIL import Image

pytestmark = pytest.mark.e2e

CLASSES = ("road", "car", "sky")
VOID = len(CLASSES)  # CamVid's convention: the value after the last class is void
COLOURS = np.array([[90, 90, 90], [200, 30, 30], [70, 130, 220]], dtype=np.float64)


def _scene(rng: np.random.Generator, h: int = 48, w: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Sky above, road below, a car box somewhere on the road, a void strip at the bottom: (image, mask)."""
    mask = np.zeros((h, w), dtype=np.uint8)
    horizon = int(rng.integers(h // 3, h // 2))
    mask[:horizon] = 2
    y0, x0 = int(rng.integers(horizon, h - 12)), int(rng.integers(0, w - 16))
    mask[y0:y0 + 10, x0:x0 + 16] = 1
    mask[-3:] = VOID
    image = COLOURS[np.minimum(mask, 2)] + rng.normal(0, 12, (h, w, 3))
    return image.clip(0, 255).astype(np.uint8), mask


def write_camvid(root, n_train: int = 12, n_val: int = 4, seed: int = 0, bad_masks: int = 0) -> None:
    """CamVid's layout: train/ trainannot/ val/ valannot/ and classes.txt; ``bad_masks`` train masks of the wrong size."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(n):
            image, mask = _scene(rng)
            Image.fromarray(image).save(root / split / f"{split}_{i:03d}.png")
            if split == "train" and i < bad_masks:
                mask = mask[:40, :50]
            Image.fromarray(mask).save(root / f"{split}annot" / f"{split}_{i:03d}.png")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")


FAST = ["data.num_workers=0", "engine.tensorboard=false"]


@pytest.fixture(scope="module")
def camvid_run(tmp_path_factory):
    """A no-flag run on a tiny CamVid-style folder (its own plan, a 12 s budget), shared by the tests below."""
    root = tmp_path_factory.mktemp("dense")
    write_camvid(root / "camvid")
    r = run_vitkit("train", "--data", root / "camvid", "--out", root / "run", "engine.time_budget=12s", *FAST,
                   check=True, timeout=240)
    return root, r


def test_no_flag_training_plans_a_segmentation_run(camvid_run):
    root, r = camvid_run
    out = r.stdout
    assert "plan (override any key with key=value):" in out
    assert "model.head=" in out and "data.img_size=" in out and "task segment" in out
    assert "val mIoU" in out
    info = json.loads((root / "run" / "run.json").read_text())
    assert info["task"] == "segment" and info["classes"] == list(CLASSES) and info["head"]
    assert info["plan"]["model.head"]["reason"]
    # The crop fits the 48 px shorter side in multiples of the model's stride.
    assert info["img_size"] <= 48 and info["img_size"] % info["stride"] == 0
    assert (root / "run" / "model.safetensors").is_file()
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert 0.0 <= summary["val_miou"] <= 1.0


def test_eval_reports_miou_per_class_iou_and_writes_the_confusion_plot(camvid_run):
    root, _ = camvid_run
    r = run_vitkit("eval", root / "run", "--data", root / "camvid", check=True)
    assert "mIoU" in r.stdout and all(c in r.stdout for c in CLASSES)
    result = json.loads((root / "run" / "eval.json").read_text())
    assert result["task"] == "segment" and 0.0 <= result["miou"] <= 1.0 and 0.0 <= result["pixel_acc"] <= 1.0
    assert list(result["per_class_iou"]) == list(CLASSES)
    ious = [v for v in result["per_class_iou"].values() if v is not None]
    assert ious and abs(np.mean(ious) - result["miou"]) < 1e-6
    # The void strip does not count: 4 val images of 48 x 64 minus their 3 void rows.
    assert result["pixels"] == 4 * 45 * 64
    png = root / "run" / "plots" / "confusion_matrix.png"
    assert result["confusion_png"] == str(png) and png.stat().st_size > 1000


def test_predict_writes_an_index_mask_and_an_overlay(camvid_run, tmp_path):
    root, _ = camvid_run
    image = root / "camvid" / "val" / "val_000.png"
    r = run_vitkit("predict", root / "run", image, "--out", tmp_path, check=True)
    mask_path, overlay_path = tmp_path / "val_000_mask.png", tmp_path / "val_000_overlay.png"
    assert str(mask_path) in r.stdout and str(overlay_path) in r.stdout
    mask, over = Image.open(mask_path), Image.open(overlay_path)
    assert mask.mode == "P" and mask.size == (64, 48) and np.asarray(mask).max() < len(CLASSES)
    assert over.mode == "RGB" and over.size == (64, 48)
    # The overlay blends the image with the class colours: it differs from the image itself.
    assert np.abs(np.asarray(over, dtype=int) - np.asarray(Image.open(image), dtype=int)).mean() > 1


def test_depth_task_trains_evaluates_and_predicts(tmp_path):
    run = tmp_path / "run"
    r = run_vitkit("train", "--data", "depth-scenes:24", "--task", "depth", "--head", "linear", "--out", run,
                   "model.name=test_vit",
                   "data.img_size=32", "data.batch_size=8", "engine.max_steps=2", "engine.amp=none", *FAST, check=True)
    assert "delta1" in r.stdout
    assert json.loads((run / "run.json").read_text())["task"] == "depth"
    r = run_vitkit("eval", run, "--data", "depth-scenes:24", check=True)
    assert "AbsRel" in r.stdout and "delta1" in r.stdout
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    r = run_vitkit("predict", run, tmp_path / "a.png", "--out", tmp_path / "pred", check=True)
    # The default loss (MiDaS's) learns inverse depth up to scale and shift: a relative disparity PNG.
    depth = Image.open(tmp_path / "pred" / "a_disparity.png")
    assert depth.size == (56, 40) and np.asarray(depth).dtype == np.uint16
    assert Image.open(tmp_path / "pred" / "a_depth_color.png").size == (56, 40)


def test_masks_of_the_wrong_size_are_one_clear_error(tmp_path):
    write_camvid(tmp_path / "camvid", bad_masks=4)  # 4 of 16 pairs: above the 5% bad-file limit
    r = run_vitkit("train", "--data", tmp_path / "camvid", "--out", tmp_path / "run", "model.name=test_vit",
                   "model.head=linear", "data.img_size=32", "engine.max_steps=1", *FAST)
    err = assert_user_error(r)
    assert "mask" in err.lower()


def test_segment_task_on_class_folders_is_one_clear_error(tmp_path):
    write_class_folder(tmp_path / "tree", per_class=4)
    r = run_vitkit("train", "--data", tmp_path / "tree", "--task", "segment", "--out", tmp_path / "run",
                   "engine.max_steps=1", *FAST)
    assert_user_error(r, "segment")


def test_task_flag_must_match_the_model(camvid_run, tmp_path):
    root, _ = camvid_run
    r = run_vitkit("eval", root / "run", "--data", root / "camvid", "--task", "depth")
    assert_user_error(r, "--task depth", "segment model")
    r = run_vitkit("explain", root / "run", root / "camvid" / "val" / "val_000.png", "--out", tmp_path)
    assert_user_error(r, "vitkit predict")
