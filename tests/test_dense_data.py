"""Segmentation and depth folders: formats, void handling, bad pairs, joint transforms, dense batches."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import (
    JointEvalTransform,
    JointTrainTransform,
    build_dense_dataset,
    build_loader,
    collate,
    prepare_data,
)
from vitkit.errors import ConfigError, DataError

H, W = 24, 32
# Class c is drawn in colour PALETTE[c]; no colour is black, so the image's 0 padding is recognisable.
PALETTE = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30], [30, 200, 200],
                    [220, 220, 220], [120, 60, 10], [10, 60, 120], [90, 90, 90], [250, 120, 180],
                    [60, 140, 60], [140, 140, 250]], dtype=np.uint8)


def _mask(rng, n_values, size=(H, W)):
    """Blocks of 4x4 pixels, each a random value below ``n_values``."""
    blocks = rng.integers(0, n_values, size=(size[0] // 4 + 1, size[1] // 4 + 1))
    return np.kron(blocks, np.ones((4, 4), np.int64))[: size[0], : size[1]].astype(np.uint8)


def _write_pair(img_path, mask_path, raw, ext=".png", mode="L", palette=None):
    img_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(PALETTE[np.minimum(raw, len(PALETTE) - 1)]).save(img_path.with_suffix(ext))
    m = Image.fromarray(raw, "L")
    if mode == "P":
        m = m.convert("P")
        m.putpalette(palette)
    m.save(mask_path)


def _camvid(root, n_train=6, n_val=3, n_values=12, classes=11, seed=0):
    rng = np.random.default_rng(seed)
    raws = {}
    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(n):
            raw = _mask(rng, n_values)
            _write_pair(root / split / f"{split}{k}.png", root / f"{split}annot" / f"{split}{k}.png", raw)
            raws[f"{split}{k}"] = raw
    if classes:
        (root / "classes.txt").write_text("\n".join(f"c{i}" for i in range(classes)) + "\n")
    return raws


def test_camvid_void_remapped_and_classes_from_classes_txt(tmp_path):
    raws = _camvid(tmp_path)
    stage = prepare_data(str(tmp_path))
    assert stage.task == "segment" and "trainannot" in stage.reason
    assert (len(stage.train), len(stage.val)) == (6, 3)
    ds = stage.train
    assert ds.num_classes == 11 and ds.classes[0] == "c0" and ds.ignore_index == 255
    assert any("11" in n and "void" in n for n in ds.notes)
    for i in range(len(ds)):
        img, target, bad = ds.load(i)
        stem = ds.source.name(ds.indices[i]).rsplit("/", 1)[-1][:-4]
        raw = raws[stem]
        mask = np.asarray(target["mask"])
        assert target["mask"].mode == "L" and img.size == (W, H) and not bad
        np.testing.assert_array_equal(mask, np.where(raw >= 11, 255, raw))
    # Pixel counts per class over the sampled training masks (all 6 here), void left out.
    train_raw = np.stack([raws[f"train{k}"] for k in range(6)])
    expect = np.bincount(train_raw[train_raw < 11].ravel(), minlength=11)
    assert stage.info.class_counts == tuple(int(c) for c in expect)
    assert stage.info.ignore_index == 255 and stage.info.typical_size == (H, W)
    assert "image pairs" in stage.scan_line()


def test_explicit_ignore_index_wins_and_other_values_are_bad(tmp_path):
    raws = _camvid(tmp_path, n_train=8, n_values=11)
    raws["train0"][0, 0] = 11
    Image.fromarray(raws["train0"], "L").save(tmp_path / "trainannot" / "train0.png")
    raws["train1"][0, 0] = 12
    Image.fromarray(raws["train1"], "L").save(tmp_path / "trainannot" / "train1.png")
    stage = prepare_data(str(tmp_path), ignore_index=11, max_bad_fraction=0.5)
    assert [n.rsplit("/", 1)[-1] for n in stage.train.bad_files] == ["train1.png"]
    assert "outside the 11 classes" in stage.scan.bad[stage.train.bad_files[0]]
    assert len(stage.train) == 7
    img, target, _ = stage.train.load([stage.train.source.name(j)[-10:] for j in stage.train.indices].index(
        "train0.png"))
    assert np.asarray(target["mask"])[0, 0] == 255


def test_image_mask_folders_without_classes_txt_split_by_seed(tmp_path):
    rng = np.random.default_rng(1)
    for k in range(10):
        _write_pair(tmp_path / "images" / f"x{k}.png", tmp_path / "masks" / f"x{k}.png", _mask(rng, 3),
                    ext=".jpg")
    ds = [build_dense_dataset(str(tmp_path), "segment", s, val_fraction=0.2, seed=3) for s in ("train", "val")]
    names = [{d.source.name(j) for j in d.indices} for d in ds]
    assert len(names[0]) == 8 and len(names[1]) == 2 and not names[0] & names[1]
    again = build_dense_dataset(str(tmp_path), "segment", "val", val_fraction=0.2, seed=3)
    assert {again.source.name(j) for j in again.indices} == names[1]
    assert ds[0].classes == ["class_0", "class_1", "class_2"] and ds[0].format == "image-mask folders"


def test_image_mask_folders_with_split_subfolders(tmp_path):
    rng = np.random.default_rng(2)
    for split, n in (("train", 4), ("val", 2)):
        for k in range(n):
            _write_pair(tmp_path / "images" / split / f"{k}.png", tmp_path / "labels" / split / f"{k}.png",
                        _mask(rng, 2))
    assert len(build_dense_dataset(str(tmp_path), "segment", "train")) == 4
    assert len(build_dense_dataset(str(tmp_path), "segment", "val")) == 2


def test_voc_palette_masks_read_as_indices(tmp_path):
    rng = np.random.default_rng(3)
    # A palette whose colours differ from the indices: reading colours would give other numbers.
    palette = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, 255 - i)]
    raws = {}
    for k in range(5):
        raw = _mask(rng, 21)
        raw[:2] = 255
        _write_pair(tmp_path / "JPEGImages" / f"{k}.jpg", tmp_path / "SegmentationClass" / f"{k}.png", raw,
                    ext=".jpg", mode="P", palette=palette)
        raws[str(k)] = raw
    Image.new("RGB", (W, H)).save(tmp_path / "JPEGImages" / "detection_only.jpg")  # no mask: not in the set
    sets = tmp_path / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("0\n1\n2\n")
    (sets / "val.txt").write_text("3\n4\n")
    stage = prepare_data(str(tmp_path))
    assert stage.train.format == "voc" and stage.train.num_classes == 21 and stage.train.classes[15] == "person"
    assert (len(stage.train), len(stage.val)) == (3, 2) and not stage.scan.bad
    _, target, _ = stage.val.load(0)
    assert Image.open(tmp_path / "SegmentationClass" / "3.png").mode == "P"
    np.testing.assert_array_equal(np.asarray(target["mask"]), raws["3"])


def test_ade20k_zero_is_void_and_classes_shift_down(tmp_path):
    rng = np.random.default_rng(4)
    raws = {}
    for split in ("training", "validation"):
        for k in range(3):
            raw = _mask(rng, 5)
            _write_pair(tmp_path / "images" / split / f"{k}.jpg", tmp_path / "annotations" / split / f"{k}.png",
                        raw, ext=".jpg")
            raws[(split, k)] = raw
    ds = build_dense_dataset(str(tmp_path), "segment", "train")
    assert ds.format == "ade20k" and ds.num_classes == 4
    _, target, _ = ds.load(0)
    raw = raws[("training", 0)]
    np.testing.assert_array_equal(np.asarray(target["mask"]), np.where(raw == 0, 255, raw.astype(int) - 1))


def test_bad_pairs_are_listed_once_and_left_out(tmp_path):
    _camvid(tmp_path, n_train=20, n_val=2)
    Image.new("RGB", (W, H)).save(tmp_path / "train" / "no_mask.png")
    Image.new("L", (W, H)).save(tmp_path / "trainannot" / "no_image.png")
    Image.new("L", (W + 4, H)).save(tmp_path / "trainannot" / "train0.png")  # another size
    Image.new("RGB", (W, H)).save(tmp_path / "trainannot" / "train1.png")  # a colour mask
    stage = prepare_data(str(tmp_path), max_bad_fraction=0.25)
    reasons = {k.rsplit("/", 1)[-1]: v for k, v in stage.scan.bad.items()}
    assert set(reasons) == {"no_mask.png", "no_image.png", "train0.png", "train1.png"}
    assert "image without a mask" in reasons["no_mask.png"]
    assert "mask without an image" in reasons["no_image.png"]
    assert "36x24 but the image is 32x24" in reasons["train0.png"]
    assert "mode RGB" in reasons["train1.png"]
    assert len(stage.train) == 18 and len(stage.train.bad_files) == 4
    with pytest.raises(DataError, match="max_bad_fraction"):
        prepare_data(str(tmp_path), max_bad_fraction=0.1)


def test_depth_folders_png_millimetres_and_npy_metres(tmp_path):
    rng = np.random.default_rng(5)
    mm = rng.integers(0, 5000, size=(H, W)).astype(np.uint16)
    mm[0, :4] = 0
    for k in range(4):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "depth").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{k}.png")
    Image.fromarray(mm).save(tmp_path / "depth" / "0.png")
    metres = rng.uniform(0.5, 10, size=(H, W)).astype(np.float32)
    metres[1, 1] = np.nan
    for k in (1, 2, 3):
        np.save(tmp_path / "depth" / f"{k}.npy", metres)
    stage = prepare_data(str(tmp_path), val_fraction=0.25, task="depth")
    assert stage.task == "depth" and stage.train.num_classes == 0 and stage.train.classes == []
    both = {stage.train.source.name(j): (stage.train, i) for i, j in enumerate(stage.train.indices)}
    both.update({stage.val.source.name(j): (stage.val, i) for i, j in enumerate(stage.val.indices)})
    ds, i = both[str(tmp_path / "images" / "0.png")]
    d = ds.load(i)[1]["depth"]
    assert d.dtype == np.float32
    np.testing.assert_allclose(d, mm.astype(np.float32) / 1000, rtol=1e-6)
    assert (d[0, :4] == 0).all()
    ds, i = both[str(tmp_path / "images" / "1.png")]
    d = ds.load(i)[1]["depth"]
    assert d[1, 1] == 0 and d[2, 2] == metres[2, 2]


def test_segment_on_class_folders_is_a_clear_error(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (W, H)).save(tmp_path / "cat" / "a.png")
    with pytest.raises(ConfigError, match="no masks found"):
        prepare_data(str(tmp_path), task="segment")
    with pytest.raises(DataError, match="no masks found"):
        build_dense_dataset(str(tmp_path), "segment")


# ---- joint transforms ------------------------------------------------------------------------

def _classify_colours(image: torch.Tensor) -> np.ndarray:
    """The class of each pixel from its colour (the nearest palette colour), 255 for black padding."""
    px = image.permute(1, 2, 0).numpy().astype(np.int64)
    dist = ((px[:, :, None, :] - PALETTE[None, None].astype(np.int64)) ** 2).sum(-1)
    cls = dist.argmin(-1)
    return np.where(px.sum(-1) == 0, 255, cls)


def _sample(seed=0, size=(H, W)):
    raw = _mask(np.random.default_rng(seed), 10, size)
    return Image.fromarray(PALETTE[raw]), {"mask": Image.fromarray(raw, "L")}, raw


@pytest.mark.parametrize("crop", [16, (40, 56)])
def test_joint_train_transform_keeps_mask_aligned(crop):
    t = JointTrainTransform(crop, scale=(0.5, 2.0), hflip=0.5, ignore_index=255, interpolation="nearest")
    for k in range(60):
        img, target, _ = _sample(k)
        out = t(img, target, random.Random(k))
        ch, cw = (crop, crop) if isinstance(crop, int) else crop
        assert out["image"].shape == (3, ch, cw) and out["image"].dtype == torch.uint8
        assert out["mask"].shape == (ch, cw) and out["mask"].dtype == torch.int64
        np.testing.assert_array_equal(out["mask"].numpy(), _classify_colours(out["image"]))
    if not isinstance(crop, int):  # crops larger than the scaled image are padded with ignore
        assert (out["mask"] == 255).any()


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 8 neighbours share their class (away from edges, where bilinear mixes colours)."""
    m = np.pad(mask, 1, mode="edge")
    same = np.ones(mask.shape, bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            same &= m[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] == mask
    return same


def test_joint_train_transform_bilinear_image_nearest_mask():
    # Bilinear blends colours across class edges; the geometry is checked exactly with "nearest" above.
    t = JointTrainTransform(20, scale=(0.5, 2.0))
    agree = []
    for k in range(30):
        img, target, _ = _sample(k)
        out = t(img, target, random.Random(k))
        mask = out["mask"].numpy()
        assert set(np.unique(mask)) <= set(range(10)) | {255}  # ids never interpolated
        inner = _interior(mask)
        assert inner.sum() > 0
        agree.append((mask == _classify_colours(out["image"]))[inner].mean())
    assert min(agree) > 0.9 and np.mean(agree) > 0.98


def test_photometric_jitter_touches_the_image_only_and_draws_are_reproducible():
    img, target, _ = _sample(7)
    plain = JointTrainTransform(16, interpolation="nearest")
    jitter = JointTrainTransform(16, color_jitter=0.4, interpolation="nearest")
    a, b = plain(img, target, random.Random(3)), jitter(img, target, random.Random(3))
    assert torch.equal(a["mask"], b["mask"]) and not torch.equal(a["image"], b["image"])
    c = jitter(img, target, random.Random(3))
    assert torch.equal(b["image"], c["image"]) and torch.equal(b["mask"], c["mask"])


def test_depth_is_resized_nearest_and_padded_with_zero():
    rng = np.random.default_rng(0)
    depth = rng.uniform(1, 5, size=(H, W)).astype(np.float32)
    img = Image.fromarray((depth * 50).astype(np.uint8))
    t = JointTrainTransform((48, 64), in_chans=1, scale=(0.5, 0.5), hflip=0.0, interpolation="nearest")
    out = t(img, {"depth": depth}, random.Random(0))
    d = out["depth"].numpy()
    assert out["image"].shape == (1, 48, 64) and d.dtype == np.float32
    assert (d[12:] == 0).all() and (d[:, 16:] == 0).all()  # 12x16 after scaling, the rest padding
    assert set(np.unique(d[:12, :16])) <= set(np.unique(depth))
    np.testing.assert_array_equal((d[:12, :16] * 50).astype(np.uint8), out["image"][0, :12, :16].numpy())


def test_eval_transform_is_full_resolution():
    img, target, raw = _sample(1, size=(30, 45))
    out = JointEvalTransform()(img, target, random.Random(0))
    assert out["image"].shape == (3, 30, 45)
    np.testing.assert_array_equal(out["mask"].numpy(), raw)


# ---- batches ---------------------------------------------------------------------------------

def test_collate_pads_dense_samples_and_reports_sizes():
    t = JointEvalTransform()
    samples = []
    for k, size in enumerate([(24, 32), (30, 20)]):
        img, target, _ = _sample(k, size)
        samples.append({**t(img, target), "index": k, "bad_files": []})
    batch = collate(samples)
    assert batch["image"].shape == (2, 3, 30, 32) and batch["mask"].shape == (2, 30, 32)
    assert batch["size"].tolist() == [[24, 32], [30, 20]] and batch["ignore_index"] == 255
    assert (batch["mask"][0, 24:] == 255).all() and (batch["mask"][1, :, 20:] == 255).all()
    assert (batch["image"][0, :, 24:] == 0).all() and (batch["image"][1, :, :, 20:] == 0).all()
    assert torch.equal(batch["mask"][1, :30, :20], samples[1]["mask"])
    assert "label" not in batch and batch["index"].tolist() == [0, 1]
    depth = [{"image": torch.zeros(1, h, 4, dtype=torch.uint8), "depth": torch.ones(h, 4), "index": 0,
              "bad_files": [], "boxes": ["x"] * h} for h in (2, 3)]
    b = collate(depth)
    assert b["depth"][0, 2].sum() == 0 and b["depth"][1].sum() == 12 and b["boxes"] == [["x", "x"], ["x"] * 3]


def test_classification_collate_is_unchanged():
    samples = [{"image": torch.full((3, 4, 4), k, dtype=torch.uint8), "label": k, "index": k, "bad_files": []}
               for k in range(3)]
    batch = collate(samples)
    assert list(batch) == ["image", "label", "index", "skipped", "bad_files"]
    assert batch["label"].tolist() == [0, 1, 2] and batch["image"].shape == (3, 3, 4, 4)


def test_loader_over_a_dense_dataset_is_reproducible(tmp_path):
    _camvid(tmp_path, n_train=6, n_val=2)
    ds = build_dense_dataset(str(tmp_path), "segment", "train")
    t = JointTrainTransform(16, ignore_index=ds.ignore_index, color_jitter=0.2)
    runs = []
    for _ in range(2):
        loader = build_loader(ds, 3, train=True, transform=t, seed=5)
        loader.set_epoch(1)
        runs.append(list(loader))
    assert len(runs[0]) == 2
    for a, b in zip(*runs):
        assert a["image"].shape == (3, 3, 16, 16) and a["mask"].shape == (3, 16, 16)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    val = build_dense_dataset(str(tmp_path), "segment", "val")
    batch = next(iter(build_loader(val, 2, train=False, transform=JointEvalTransform())))
    assert batch["image"].shape == (2, 3, H, W) and "size" not in batch and batch["ignore_index"] == 255


def test_gray_pairs_give_one_channel_and_stats(tmp_path):
    rng = np.random.default_rng(6)
    for k in range(4):
        raw = _mask(rng, 3)
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        Image.fromarray((raw * 60).astype(np.uint8), "L").save(tmp_path / "images" / f"{k}.png")
        Image.fromarray(raw, "L").save(tmp_path / "masks" / f"{k}.png")
    stage = prepare_data(str(tmp_path), val_fraction=0.25)
    assert stage.info.in_chans == 1 and stage.train.in_chans == 1 and stage.val.in_chans == 1
    img, target, _ = stage.train.load(0)
    assert img.mode == "L" and np.array_equal(np.asarray(img) // 60, np.asarray(target["mask"]))
    assert stage.train.stats() == {"typical_size": (H, W), "in_chans": 1, "num_classes": 3, "n": 3}


def test_class_folders_still_stage_as_classification(tmp_path):
    for c in ("cat", "dog"):
        for k in range(3):
            (tmp_path / c).mkdir(exist_ok=True)
            Image.new("RGB", (W, H), (40 * k, 0, 0)).save(tmp_path / c / f"{k}.png")
    stage = prepare_data(str(tmp_path), val_fraction=0.34)
    assert stage.task == "classify" and "classification" in stage.reason
    assert stage.train.classes == ["cat", "dog"] and "image files" in stage.scan_line()
