"""Detection data: COCO and VOC readers, bad annotations, the built-in scenes, box transforms, batches, the task rule."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import collate, detect_task
from vitkit.data.boxes_tf import BoxEvalTransform, BoxTrainTransform
from vitkit.data.detection import build_detection_dataset
from vitkit.data.loader import build_loader
from vitkit.data.scenes import ScenesDataset
from vitkit.data.stage import prepare_data
from vitkit.errors import ConfigError, DataError


def _png(path, size=(48, 32), rect=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((size[1], size[0], 3), np.uint8)
    if rect is not None:
        x0, y0, x1, y1 = rect
        a[y0:y1, x0:x1] = 255
    Image.fromarray(a).save(path)


CATS = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "bird"}]


def _coco_json(path, images, anns, cats=CATS):
    path.parent.mkdir(parents=True, exist_ok=True)
    ims = [{"id": i, "file_name": f, "width": w, "height": h} for i, f, (w, h) in images]
    full = [{"id": k + 1, "iscrowd": 0, **a} for k, a in enumerate(anns)]
    path.write_text(json.dumps({"images": ims, "annotations": full, "categories": cats}))


def _coco_folder(root):
    """Train: a.png (2 boxes, one crowd), b.png (none); val: c.png (1 box). Images 48x32."""
    for n in "abc":
        _png(root / "images" / f"{n}.png")
    _coco_json(root / "annotations" / "instances_train.json",
               [(10, "a.png", (48, 32)), (11, "b.png", (48, 32))],
               [{"image_id": 10, "category_id": 7, "bbox": [1.5, 2.0, 10.0, 20.0]},
                {"image_id": 10, "category_id": 3, "bbox": [20, 4, 8, 6]},
                {"image_id": 10, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1}])
    _coco_json(root / "annotations" / "instances_val.json", [(12, "c.png", (48, 32))],
               [{"image_id": 12, "category_id": 1, "bbox": [4, 4, 10, 10]}])
    return root


def test_coco_boxes_labels_and_category_ids(tmp_path):
    root = _coco_folder(tmp_path)
    train = build_detection_dataset(str(root), "train")
    val = build_detection_dataset(str(root), "val")
    assert (train.format, train.task, len(train), len(val)) == ("coco", "detect", 2, 1)
    # Non-contiguous COCO ids 1, 3, 7 become classes 0..2 in id order; category_ids maps back.
    assert train.classes == ["cat", "dog", "bird"] and train.category_ids == [1, 3, 7] and train.num_classes == 3
    img, target, bad = train.load(0)
    assert img.size == (48, 32) and bad == [] and target["image_id"] == 10
    np.testing.assert_array_equal(target["boxes"], np.array([[1.5, 2, 11.5, 22], [20, 4, 28, 10]], np.float32))
    assert target["labels"].tolist() == [2, 1]  # the crowd box is left out, as DETR's loader does
    assert target["boxes"].dtype == np.float32 and target["labels"].dtype == np.int64
    _, empty, _ = train.load(1)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    _, t, _ = val.load(0)
    assert t["labels"].tolist() == [0] and t["image_id"] == 12 and t["boxes"].tolist() == [[4, 4, 14, 14]]


def test_one_coco_json_is_split_by_a_seeded_fraction(tmp_path):
    images, anns = [], []
    for i in range(20):
        _png(tmp_path / f"im{i}.png")
        images.append((i + 1, f"im{i}.png", (48, 32)))
        anns.append({"image_id": i + 1, "category_id": 1 if i % 4 else 7, "bbox": [2, 2, 8, 8]})
    _coco_json(tmp_path / "boxes.json", images, anns)
    ids = {s: [build_detection_dataset(str(tmp_path), s, val_fraction=0.2, seed=3).load(i)[1]["image_id"]
               for i in range(len(build_detection_dataset(str(tmp_path), s, val_fraction=0.2, seed=3)))]
           for s in ("train", "val")}
    assert sorted(ids["train"] + ids["val"]) == list(range(1, 21)) and len(ids["val"]) == 4
    again = build_detection_dataset(str(tmp_path / "boxes.json"), "val", val_fraction=0.2, seed=3)
    assert sorted(again.load(i)[1]["image_id"] for i in range(len(again))) == sorted(ids["val"])
    # Stratified by the rarest class in each image: the 5 images of class 7 reach val too.
    assert any((i - 1) % 4 == 0 for i in ids["val"])


def _voc_xml(path, filename, objects, size=(48, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    objs = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    path.write_text(f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
                    f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>")


def test_voc_devkit_layout_with_image_sets(tmp_path):
    boxes = {"a": [("person", (5, 6, 20, 30))], "b": [("dog", (1, 1, 48, 32)), ("person", (10, 10, 12, 14))],
             "c": [("cat", (3, 4, 9, 9))]}
    for s, objs in boxes.items():
        _png(tmp_path / "JPEGImages" / f"{s}.jpg")
        _voc_xml(tmp_path / "Annotations" / f"{s}.xml", f"{s}.jpg", objs)
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    (tmp_path / "ImageSets" / "Main" / "val.txt").write_text("c\n")
    train = build_detection_dataset(str(tmp_path), "train")
    val = build_detection_dataset(str(tmp_path), "val")
    assert train.format == "voc" and (len(train), len(val)) == (2, 1)
    assert train.classes == ["cat", "dog", "person"] and train.category_ids == [1, 2, 3]
    # The devkit's 1-based inclusive pixel indices: xmin, ymin move to the pixel edge (-1).
    _, a, _ = train.load(0)
    assert a["boxes"].tolist() == [[4, 5, 20, 30]] and a["labels"].tolist() == [2]
    _, b, _ = train.load(1)
    assert b["boxes"].tolist() == [[0, 0, 48, 32], [9, 9, 12, 14]] and b["labels"].tolist() == [1, 2]
    assert any("1-based" in n for n in train.notes)


@pytest.mark.parametrize("xml_dir", ["images", "voc"])
def test_voc_xml_beside_the_images_or_in_a_sibling_folder(tmp_path, xml_dir):
    for k in range(10):
        _png(tmp_path / "images" / f"p{k}.png")
        _voc_xml(tmp_path / xml_dir / f"p{k}.xml", f"p{k}.png", [("raccoon", (0, k, 20, 25))])
    choice = detect_task(str(tmp_path))
    assert choice.task == "detect" and "Pascal VOC" in choice.reason
    train = build_detection_dataset(str(tmp_path), "train", val_fraction=0.2)
    val = build_detection_dataset(str(tmp_path), "val", val_fraction=0.2)
    assert (len(train), len(val)) == (8, 2) and train.classes == ["raccoon"]
    # A box starting at 0 means the files were written 0-based: read as they are.
    img, t, _ = train.load(0)
    k = int(t["image_id"]) - 1
    assert t["boxes"].tolist() == [[0, k, 20, 25]] and img.size == (48, 32)


def _bad_coco(root, n_good: int):
    """One image of each bad-annotation kind, then ``n_good`` clean images."""
    bad = [([10, 10, 60, 10], 1), ([100, 100, 5, 5], 1), ([5, 5, 0, 8], 1), ([2, 2, 6, 6], 99), ([1, 2, "x", 4], 1)]
    images, anns = [], []
    for i, (bbox, cat) in enumerate(bad):
        _png(root / "images" / f"bad{i}.png")
        images.append((i + 1, f"bad{i}.png", (48, 32)))
        anns += [{"image_id": i + 1, "category_id": cat, "bbox": bbox},
                 {"image_id": i + 1, "category_id": 1, "bbox": [1, 1, 4, 4]}]
    images.append((99, "missing.png", (48, 32)))
    for i in range(n_good):
        _png(root / "images" / f"ok{i}.png")
        images.append((100 + i, f"ok{i}.png", (48, 32)))
        anns.append({"image_id": 100 + i, "category_id": 3, "bbox": [4, 4, 8, 8]})
    _coco_json(root / "annotations" / "instances_train.json", images, anns)


def test_bad_annotations_reported_once_and_left_out(tmp_path, caplog):
    _bad_coco(tmp_path, n_good=200)
    with caplog.at_level(logging.WARNING, logger="vitkit.data"):
        train = build_detection_dataset(str(tmp_path), "train", val_fraction=0.5, seed=0)
        val = build_detection_dataset(str(tmp_path), "val", val_fraction=0.5, seed=0)
    kinds = ["partly outside the image, clipped", "wholly outside", "zero width", "unknown category",
             "not 4 finite numbers", "file is missing"]
    for kind in kinds:
        lines = [r.getMessage() for r in caplog.records if kind in r.getMessage()]
        assert len(lines) == 1, (kind, lines)  # once, although both splits were built
        assert lines[0].split(": ", 1)[1].startswith("1 ")
        assert any(kind in n for n in train.notes)
    assert len(train) + len(val) == 205  # the missing image is left out, the others kept
    by_name = {}
    for ds in (train, val):
        for j in ds.indices:
            r = ds.source.records[j]
            by_name[r.file.rsplit("/", 1)[-1]] = r
    # Clipped to the image; the other bad boxes dropped, each image keeping its good box.
    assert by_name["bad0.png"].boxes.tolist() == [[10, 10, 48, 20], [1, 1, 5, 5]]
    for i in range(1, 5):
        assert by_name[f"bad{i}.png"].boxes.tolist() == [[1, 1, 5, 5]], i
    assert "missing.png" not in by_name


def test_too_many_bad_annotations_is_a_data_error(tmp_path):
    _bad_coco(tmp_path, n_good=20)
    with pytest.raises(DataError, match=r"6 of 26 images .* bad annotations.*max_bad_fraction"):
        build_detection_dataset(str(tmp_path), "train")
    assert len(build_detection_dataset(str(tmp_path), "train", max_bad_fraction=0.5)) > 0


def _rect_bounds(image: torch.Tensor) -> tuple[float, float, float, float] | None:
    ys, xs = np.nonzero(image[0].numpy() > 127)
    return None if len(xs) == 0 else (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


@pytest.mark.parametrize("seed", range(12))
def test_transforms_keep_boxes_on_the_pixels(seed):
    rect = (13, 7, 41, 29)  # a filled white rectangle on black: its box is the bright pixels' bounds
    img = Image.new("RGB", (64, 40))
    img.paste((255, 255, 255), rect)
    target = {"boxes": np.array([rect], np.float32), "labels": np.array([4]), "image_id": 5}
    tfs = [BoxEvalTransform(48), BoxTrainTransform(48, crop_p=1.0, scale=(0.3, 1.0), hflip=0.5),
           BoxTrainTransform(56, sizes=(32, 48, 80), crop=False, hflip=1.0, color_jitter=0.2)]
    for tf in tfs:
        out = tf(img, target, random.Random(seed))
        assert out["image"].dtype == torch.uint8 and out["orig_size"].tolist() == [40, 64] and out["image_id"] == 5
        assert out["boxes"].dtype == torch.float32 and out["labels"].dtype == torch.int64
        h, w = out["image"].shape[-2:]
        if not isinstance(tf, BoxTrainTransform) or not tf.crop:
            assert max(h, w) in (getattr(tf, "sizes", None) or (tf.size,)) and abs(w / h - 64 / 40) < 0.05
        seen = _rect_bounds(out["image"])
        if len(out["boxes"]) == 0:  # dropped by the crop: the rectangle is gone or a sliver
            assert seen is None or min(seen[2] - seen[0], seen[3] - seen[1]) <= tf.min_box_px + 1
            continue
        assert out["labels"].tolist() == [4]
        np.testing.assert_allclose(out["boxes"][0].numpy(), np.array(seen, np.float32), atol=1.0)


def test_transform_drops_boxes_the_crop_cuts_away():
    img = Image.new("RGB", (100, 100))
    target = {"boxes": np.array([[0, 0, 10, 10], [90, 90, 100, 100], [40, 40, 42, 42]], np.float32),
              "labels": np.array([0, 1, 2]), "image_id": 0}
    tf = BoxTrainTransform(100, crop_p=1.0, scale=(0.5, 0.5), hflip=0.0)
    tf.crop_box = lambda w, h, rng: (30, 30, 80, 80)
    out = tf(img, target, random.Random(0))
    # Both corner boxes are outside the crop; the small box inside it is kept and doubled in size.
    assert out["labels"].tolist() == [2] and out["boxes"].tolist() == [[20, 20, 24, 24]]


def test_collate_variable_box_counts(tmp_path):
    tf = BoxEvalTransform(40)
    samples = []
    for k, (size, n) in enumerate([((40, 40), 0), ((40, 20), 1), ((20, 40), 3)]):
        target = {"boxes": np.tile(np.array([[1, 2, 5, 6]], np.float32), (n, 1)), "labels": np.arange(n),
                  "image_id": k}
        samples.append({**tf(Image.new("RGB", size), target, random.Random(0)), "index": k, "bad_files": []})
    batch = collate(samples)
    assert batch["image"].shape == (3, 3, 40, 40)
    assert batch["size"].tolist() == [[40, 40], [20, 40], [40, 20]] and batch["orig_size"].shape == (3, 2)
    assert [b.shape for b in batch["boxes"]] == [(0, 4), (1, 4), (3, 4)]
    assert [lab.tolist() for lab in batch["labels"]] == [[], [0], [0, 1, 2]] and batch["image_id"] == [0, 1, 2]
    # Equal sizes and equal box counts: "size" is still there and boxes stay a list.
    same = collate([samples[1], samples[1]])
    assert same["size"].tolist() == [[20, 40]] * 2 and isinstance(same["boxes"], list)


def test_prepare_data_on_a_tiny_coco_folder(tmp_path):
    root = _coco_folder(tmp_path)
    stage = prepare_data(str(root))
    assert stage.task == "detect" and "COCO" in stage.reason
    info = stage.info
    assert (info.n_train, info.n_val, info.n_boxes_train, info.n_boxes_val) == (2, 1, 2, 1)
    assert info.classes == ("cat", "dog", "bird") and info.category_ids == (1, 3, 7) and info.num_classes == 3
    assert info.typical_size == (32, 48) and info.in_chans == 1  # black PNGs are gray
    assert info.boxes_per_image == 1.0 and info.class_counts == (0, 1, 1)
    assert info.box_area_frac == pytest.approx(np.median([200 / 1536, 48 / 1536]))
    assert stage.scan_line().startswith("checked 3 image files")
    loader = build_loader(stage.train, 2, train=False, transform=BoxEvalTransform(24, in_chans=stage.in_chans))
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, 16, 24) and batch["size"].tolist() == [[16, 24]] * 2
    assert batch["boxes"][0].tolist() == [[0.75, 1.0, 5.75, 11.0], [10, 2, 14, 5]] and batch["image_id"] == [10, 11]


def test_prepare_data_leaves_out_an_image_that_does_not_match_its_annotations(tmp_path):
    root = _coco_folder(tmp_path)
    _png(root / "images" / "b.png", size=(20, 20))
    for name in ("d", "e", "f", "g"):
        _png(root / "images" / f"{name}.png")
    ann = json.loads((root / "annotations" / "instances_train.json").read_text())
    ann["images"] += [{"id": 20 + k, "file_name": f"{n}.png", "width": 48, "height": 32} for k, n in enumerate("defg")]
    (root / "annotations" / "instances_train.json").write_text(json.dumps(ann))
    stage = prepare_data(str(root), max_bad_fraction=0.5)
    assert stage.train.bad_files == [str(root / "images" / "b.png")] and len(stage.train) == 5
    assert "20x20 but its annotations say 48x32" in stage.scan.lines()[0]


def test_builtin_scenes_for_detection():
    scenes = ScenesDataset(6, split="val", task="detect")
    stage = prepare_data("scenes:20", task="detect")
    ds = stage.val
    assert ds.format == "scenes" and ds.classes == ["circle", "square", "triangle", "star", "hexagon", "cross"]
    assert ds.category_ids == [1, 2, 3, 4, 5, 6] and len(ds) == 50 and stage.info.n_boxes_val > 0
    for i in range(6):
        _, ref, _ = scenes.load(i)
        _, t, _ = ds.load(i)
        assert t["labels"].tolist() == (ref["labels"] - 1).tolist() and t["image_id"] == i
        np.testing.assert_array_equal(t["boxes"], ref["boxes"])
        assert (t["labels"] >= 0).all() and (t["labels"] < 6).all()


def test_detect_task_precedence(tmp_path):
    both = _coco_folder(tmp_path / "both")
    for n in "abc":
        _voc_xml(both / "voc" / f"{n}.xml", f"{n}.png", [("cat", (1, 1, 5, 5))])
    choice = detect_task(str(both))
    assert choice.task == "detect" and "COCO" in choice.reason and "the COCO JSON is used" in choice.reason
    ds = build_detection_dataset(str(both), "train")
    assert ds.format == "coco" and "voc/" in ds.note and ds.note in ds.notes
    voc_only = tmp_path / "voc_only"
    _png(voc_only / "images" / "a.png")
    _voc_xml(voc_only / "labels_xml" / "a.xml", "a.png", [("cat", (1, 1, 5, 5))])
    assert detect_task(str(voc_only)).task == "detect"
    # XML files that share no name with an image are not annotations.
    other = tmp_path / "other"
    _png(other / "images" / "a.png")
    _voc_xml(other / "config" / "settings.xml", "x", [])
    assert detect_task(str(other)).task == "classify"
    with pytest.raises(ConfigError, match="no boxes"):
        detect_task(str(other), "detect")
    with pytest.raises(DataError, match="no detection annotations"):
        build_detection_dataset(str(other), "train")
    assert prepare_data("scenes:10", task="promptable").task == "promptable"  # instance masks have a reader


@pytest.mark.parametrize("fmt", ["coco", "voc"])
def test_split_folders_with_their_own_annotations(tmp_path, fmt):
    # As Roboflow exports: train/ and valid/ each hold their images with a COCO JSON or XML files.
    for split, n in (("train", 3), ("valid", 2)):
        for k in range(n):  # the same names in both folders: the split is by folder, not by name
            _png(tmp_path / split / f"x{k}.png")
            if fmt == "voc":
                _voc_xml(tmp_path / split / f"x{k}.xml", f"x{k}.png", [("car", (0, 1, 9 + k, 9))])
        if fmt == "coco":
            _coco_json(tmp_path / split / "_annotations.coco.json", [(k, f"x{k}.png", (48, 32)) for k in range(n)],
                       [{"image_id": k, "category_id": 3, "bbox": [0, 1, 9 + k, 8]} for k in range(n)])
    assert detect_task(str(tmp_path)).task == "detect"
    train = build_detection_dataset(str(tmp_path), "train")
    val = build_detection_dataset(str(tmp_path), "val")
    assert (train.format, len(train), len(val)) == (fmt, 3, 2)
    assert [r.file for r in val.source.records] == [str(tmp_path / "valid" / f"x{k}.png") for k in range(2)]
    assert sorted(val.load(i)[1]["boxes"].tolist()[0][2] for i in range(2)) == [9, 10]


def test_a_json_that_is_not_coco_is_a_clear_error(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "boxes.json").write_text(json.dumps({"images": [{"file_name": "a.png"}],
                                                     "annotations": [{"bbox": [0, 0, 1, 1]}], "categories": []}))
    with pytest.raises(DataError, match="not a COCO detection JSON"):
        build_detection_dataset(str(tmp_path), "train")


def test_voc_class_list_unknown_names_and_broken_xml(tmp_path, caplog):
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    for k in range(4):
        _png(tmp_path / "images" / f"v{k}.png")
    _voc_xml(tmp_path / "images" / "v0.xml", "v0.png", [("cat", (2, 3, 9, 9)), ("horse", (2, 2, 8, 8))])
    _voc_xml(tmp_path / "images" / "v1.xml", "v1.png", [("dog", (2, 3, 9, 9))])
    _voc_xml(tmp_path / "images" / "v2.xml", "v2.png", [("dog", (6, 5, 4, 9))])  # xmax < xmin
    (tmp_path / "images" / "v3.xml").write_text("<annotation><object>")
    with caplog.at_level(logging.WARNING, logger="vitkit.data"):
        train = build_detection_dataset(str(tmp_path), "train", val_fraction=0.3, max_bad_fraction=1.0)
        val = build_detection_dataset(str(tmp_path), "val", val_fraction=0.3, max_bad_fraction=1.0)
    assert train.classes == ["dog", "cat"]  # the order of classes.txt
    recs = {r.file.rsplit("/", 1)[-1]: r for ds in (train, val) for r in (ds.source.records[j] for j in ds.indices)}
    assert sorted(recs) == ["v0.png", "v1.png", "v2.png"]  # v3's XML cannot be parsed: left out
    assert recs["v0.png"].boxes.tolist() == [[1, 2, 9, 9]] and recs["v0.png"].labels.tolist() == [1]
    assert recs["v2.png"].boxes.shape == (0, 4)
    text = "\n".join(r.getMessage() for r in caplog.records)
    for kind in ("unknown category", "zero width", "cannot be parsed"):
        assert text.count(kind) == 1, kind
