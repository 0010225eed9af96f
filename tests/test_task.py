"""The task rule: which task each data layout serves, and the errors for ambiguous or wrong requests."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vitkit.data import TASKS, detect_task
from vitkit.errors import ConfigError, PathNotFoundError


def _png(path, size=(32, 24), mode="RGB", value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def _pairs(root, image_dir, mask_dir, stems=("a", "b"), mask_ext=".png"):
    for s in stems:
        _png(root / image_dir / f"{s}.jpg")
        if mask_ext == ".npy":
            (root / mask_dir).mkdir(parents=True, exist_ok=True)
            np.save(root / mask_dir / f"{s}.npy", np.ones((24, 32), np.float32))
        else:
            _png(root / mask_dir / f"{s}.png", mode="L")


def test_camvid_layout_is_segmentation(tmp_path):
    _pairs(tmp_path, "train", "trainannot")
    _pairs(tmp_path, "val", "valannot")
    choice = detect_task(str(tmp_path))
    assert choice.task == "segment"
    assert "trainannot/" in choice.reason and "segmentation" in choice.reason


@pytest.mark.parametrize("mask_dir", ["masks", "labels", "annotations"])
def test_image_mask_folders_are_segmentation(tmp_path, mask_dir):
    _pairs(tmp_path, "images", mask_dir)
    assert detect_task(str(tmp_path)).task == "segment"


def test_ade20k_layout_is_segmentation(tmp_path):
    _pairs(tmp_path, "images/training", "annotations/training")
    _pairs(tmp_path, "images/validation", "annotations/validation")
    choice = detect_task(str(tmp_path))
    assert choice.task == "segment" and "ade20k" in choice.reason


def test_unrelated_image_folders_are_class_folders(tmp_path):
    # Two class folders named like a mask layout but holding different files: classification.
    _pairs(tmp_path, "images", "masks", stems=())
    for s in ("a", "b"):
        _png(tmp_path / "images" / f"{s}.jpg")
        _png(tmp_path / "masks" / f"other_{s}.png")
    assert detect_task(str(tmp_path)).task == "classify"


def _voc(root, boxes: bool):
    _pairs(root, "JPEGImages", "SegmentationClass")
    if boxes:
        (root / "Annotations").mkdir()
        (root / "Annotations" / "a.xml").write_text("<annotation><object><bndbox/></object></annotation>")


def test_voc_segmentation_only(tmp_path):
    _voc(tmp_path, boxes=False)
    assert detect_task(str(tmp_path)).task == "segment"


def test_voc_with_boxes_and_masks_is_ambiguous(tmp_path):
    _voc(tmp_path, boxes=True)
    with pytest.raises(ConfigError, match="--task"):
        detect_task(str(tmp_path))
    assert detect_task(str(tmp_path), "segment").task == "segment"
    assert detect_task(str(tmp_path), "detect").task == "detect"


def test_voc_boxes_only_is_detection(tmp_path):
    _png(tmp_path / "JPEGImages" / "a.jpg")
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "a.xml").write_text("<annotation/>")
    choice = detect_task(str(tmp_path))
    assert choice.task == "detect" and "Annotations" in choice.reason


def test_depth_folders(tmp_path):
    _pairs(tmp_path, "images", "depth", mask_ext=".npy")
    choice = detect_task(str(tmp_path))
    assert choice.task == "depth" and "depth/" in choice.reason


def test_masks_and_depth_together_are_ambiguous(tmp_path):
    _pairs(tmp_path, "images", "masks")
    _pairs(tmp_path, "images", "depth", mask_ext=".npy")
    with pytest.raises(ConfigError, match="--task"):
        detect_task(str(tmp_path))
    assert detect_task(str(tmp_path), "depth").task == "depth"


def _coco(path, segmentation: bool):
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4]}
    if segmentation:
        ann["segmentation"] = [[0, 0, 4, 0, 4, 4]]
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [ann],
                                "categories": [{"id": 1, "name": "x"}]}))


def test_coco_boxes_are_detection_and_masks_promptable_only_when_asked(tmp_path):
    _png(tmp_path / "images" / "a.jpg")
    (tmp_path / "annotations").mkdir()
    _coco(tmp_path / "annotations" / "instances_train.json", segmentation=True)
    assert detect_task(str(tmp_path)).task == "detect"
    assert detect_task(str(tmp_path), "promptable").task == "promptable"
    (tmp_path / "b.json").write_text("{}")
    only_boxes = tmp_path / "boxes.json"
    _coco(only_boxes, segmentation=False)
    assert detect_task(str(only_boxes)).task == "detect"
    with pytest.raises(ConfigError, match="no COCO masks"):
        detect_task(str(only_boxes), "promptable")


def test_caption_listings(tmp_path):
    jl = tmp_path / "caps.jsonl"
    jl.write_text(json.dumps({"image": "a.jpg", "caption": "a red square"}) + "\n")
    assert detect_task(str(jl)).task == "caption"
    csv_caps = tmp_path / "caps.csv"
    csv_caps.write_text("path,text\na.jpg,a red square\n")
    assert detect_task(str(csv_caps)).task == "caption"
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.jpg,cat\n")
    assert detect_task(str(labels)).task == "classify"
    folder = tmp_path / "f"
    _png(folder / "a.jpg")
    (folder / "captions.jsonl").write_text(json.dumps({"file": "a.jpg", "text": "x"}) + "\n")
    assert detect_task(str(folder)).task == "caption"


def test_class_folders_are_classification_and_refuse_segment(tmp_path):
    for c in ("cat", "dog"):
        _png(tmp_path / "train" / c / "a.jpg")
        _png(tmp_path / "val" / c / "a.jpg")
    choice = detect_task(str(tmp_path))
    assert choice.task == "classify"
    with pytest.raises(ConfigError, match="no masks found") as e:
        detect_task(str(tmp_path), "segment")
    assert "trainannot" in str(e.value) and "SegmentationClass" in str(e.value)
    with pytest.raises(ConfigError, match="no depth maps"):
        detect_task(str(tmp_path), "depth")
    assert detect_task(str(tmp_path), "classify").task == "classify"


def test_builtins_and_unknown_task():
    assert detect_task("shapes").task == "classify"
    assert detect_task("shapes:100").task == "classify"
    assert detect_task("scenes:50").task == "segment"
    assert detect_task("scenes", "detect").task == "detect"
    assert detect_task("depth-scenes:20").task == "depth"
    with pytest.raises(ConfigError, match="serves classify"):
        detect_task("shapes", "segment")
    with pytest.raises(ConfigError) as e:
        detect_task("shapes", "panoptic")
    assert all(t in str(e.value) for t in TASKS)


def test_missing_path_is_left_to_the_reader(tmp_path):
    # Classification's reader raises its own PathNotFoundError; the rule must not change that.
    assert detect_task(str(tmp_path / "nope")).task == "classify"
    assert detect_task("shards-{000..009}.tar").task == "classify"
    with pytest.raises(PathNotFoundError):
        detect_task(str(tmp_path / "nope"), "segment")
