"""Image-text data: caption listings, image-text WebDataset shards, the captioned built-ins, the
caption transform, and the caption branch of the task rule and of prepare_data."""

from __future__ import annotations

import io
import json
import logging
import random
import re
import tarfile

import numpy as np
import pytest
import torch
from helpers import lazy_peer
from PIL import Image

from vitkit.data import (
    DEFAULT_CLASSES,
    CaptionShards,
    CaptionTransform,
    ShapesDataset,
    build_caption_dataset,
    captions_summary,
    collate_captions,
    detect_task,
    prepare_data,
)
from vitkit.data.shapes import _BACKGROUNDS, _COLOURS
from vitkit.errors import ConfigError, DataError, PathNotFoundError

timm_transforms = lazy_peer("timm.data.transforms")


def _image(path, size=(40, 30), value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(value).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path)


def _flickr_like(root, n=20, per_row=False):
    """``n`` images with two captions each, in Flickr's layout (or one caption per row, COCO style)."""
    rows = []
    for k in range(n):
        _image(root / "images" / f"im{k:02d}.png", value=k)
        caps = [f"picture {k} first", f"picture {k} second"]
        if per_row:
            rows += [{"image": f"images/im{k:02d}.png", "caption": c} for c in caps]
        else:
            rows.append({"image": f"images/im{k:02d}.png", "captions": caps})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _files(ds):
    return {ds.source.name(j) for j in ds.indices}


@pytest.mark.parametrize("per_row", [False, True])
def test_listing_is_split_by_image_and_seeded(tmp_path, per_row):
    root = _flickr_like(tmp_path, per_row=per_row)
    tr, va = (build_caption_dataset(str(root), s, val_fraction=0.25, seed=3) for s in ("train", "val"))
    assert (len(tr), len(va)) == (15, 5) and not _files(tr) & _files(va) and len(_files(tr) | _files(va)) == 20
    # Every caption of an image travels with it: rows of the same image were merged.
    for ds in (tr, va):
        for i in range(len(ds)):
            img, target, bad = ds.load(i)
            k = int(ds.source.name(ds.indices[i])[-6:-4])
            assert target["captions"] == [f"picture {k} first", f"picture {k} second"] and bad == []
            assert target["label"] is None and img.size == (40, 30)
    assert sorted(tr.all_captions() + va.all_captions()) == sorted(f"picture {k} {w}" for k in range(20)
                                                                   for w in ("first", "second"))
    assert _files(build_caption_dataset(str(root / "captions.jsonl"), "val", val_fraction=0.25, seed=3)) == _files(va)
    assert _files(build_caption_dataset(str(root), "val", val_fraction=0.25, seed=4)) != _files(va)
    s = tr.stats()
    assert s["captions_per_image"] == 2.0 and s["caption_words"] == 3.0 and s["typical_size"] == (30, 40)
    assert tr.classes is None and tr.labels is None and tr.task == "caption"


def test_csv_listing_with_json_cells_and_labels(tmp_path):
    for k in range(6):
        _image(tmp_path / f"{k}.png", value=k)
    lines = ["file,captions,label"] + [f'{k}.png,"[""a {c} one"", ""the {c}""]",{c}'
                                        for k, c in enumerate(["cat", "dog"] * 3)]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    assert detect_task(str(tmp_path / "pairs.csv")).task == "caption"
    ds = build_caption_dataset(str(tmp_path / "pairs.csv"), "train", val_fraction=0.3)
    assert ds.classes == ["cat", "dog"] and ds.format == "csv"
    for i in range(len(ds)):
        _, target, _ = ds.load(i)
        name = ds.classes[target["label"]]
        assert target["captions"] == [f"a {name} one", f"the {name}"] and ds.labels[i] == target["label"]


def test_bad_rows_are_counted_and_judged(tmp_path, caplog):
    root = _flickr_like(tmp_path, n=30)
    rows = (root / "captions.jsonl").read_text().splitlines()
    rows[0] = json.dumps({"image": "images/gone.png", "captions": ["lost"]})
    rows[1] = json.dumps({"image": "images/im01.png", "captions": ["", "  "]})
    (root / "captions.jsonl").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="vitkit.data"):
        tr = build_caption_dataset(str(root), "train", val_fraction=0.2, max_bad_fraction=0.1)
        va = build_caption_dataset(str(root), "val", val_fraction=0.2, max_bad_fraction=0.1)
    assert len(tr) + len(va) == 28
    assert any("missing image files" in r.getMessage() for r in caplog.records)
    assert any("rows without a caption" in r.getMessage() and "im01" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match=r"2 of 30 rows cannot be used.*max_bad_fraction=0.05"):
        build_caption_dataset(str(root), "train", max_bad_fraction=0.05)
    (tmp_path / "plain").mkdir()
    _image(tmp_path / "plain" / "a" / "x.png")
    with pytest.raises(DataError, match="no captions found"):
        build_caption_dataset(str(tmp_path / "plain"))
    with pytest.raises(PathNotFoundError):
        build_caption_dataset(str(tmp_path / "nothing.jsonl"))
    with pytest.raises(ConfigError, match="split"):
        build_caption_dataset(str(root), "test")
    with pytest.raises(DataError, match="shapes-captions:N"):
        build_caption_dataset("shapes-captions:0")


def test_named_listings_are_the_splits(tmp_path):
    root = _flickr_like(tmp_path, n=6)
    rows = (root / "captions.jsonl").read_text().splitlines()
    (root / "captions.jsonl").unlink()
    (root / "train.jsonl").write_text("\n".join(rows[:4]) + "\n")
    (root / "val.jsonl").write_text("\n".join(rows[4:]) + "\n")
    assert (len(build_caption_dataset(str(root), "train")), len(build_caption_dataset(str(root), "val"))) == (4, 2)


def test_shapes_captions_describe_their_image():
    """Captions name the shape drawn, the colour nearest the shape's pixels and the background kind;
    the pixels are those of the classification shapes (same seed)."""
    ds = build_caption_dataset("shapes-captions:60", "val", seed=2)
    plain = ShapesDataset(n=len(ds), split="val", seed=2)
    assert detect_task("shapes-captions:60").task == "caption"
    assert ds.classes == list(DEFAULT_CLASSES) and ds.labels == [j % 6 for j in range(len(ds))]
    wordings = set()
    for i in range(12):
        img, target, _ = ds.load(i)
        s = plain.sample(i)
        assert np.array_equal(np.asarray(img), np.asarray(s["image"]))
        shape = DEFAULT_CLASSES[target["label"]]
        m = s["mask"]
        inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]  # no anti-aliased edge
        mean = np.asarray(img, np.float32)[1:-1, 1:-1][inner].mean(axis=0)
        colour = min(_COLOURS, key=lambda c: np.linalg.norm(np.asarray(_COLOURS[c]) - mean))
        background = next(b for b in _BACKGROUNDS if b in s["caption"])
        caps = target["captions"]
        assert len(caps) == len(set(caps)) == 5 and caps == ds.captions_of(ds.indices[i])
        for c in caps:
            words = c.replace(",", "").split()
            assert shape in words and colour in words and background in words, (c, colour)
            assert not c.startswith(("a photo", "an image", "a picture"))  # unlike zero-shot prompts
            generic = c.replace(background, "{b}").replace(shape, "{s}").replace(colour, "{c}")
            wordings.add(re.sub(r"\ban\b", "a", generic))
    assert len(wordings) >= 6  # several paraphrases are in use
    again = build_caption_dataset("shapes-captions:60", "val", seed=2)
    assert again.load(5)[1] == ds.load(5)[1] and len(ds.all_captions()) == 5 * len(ds)


def test_scenes_serve_captions():
    ds = build_caption_dataset("scenes:10", "train", seed=1)
    assert detect_task("scenes", "caption").task == "caption" and ds.classes is None and len(ds) == 10
    img, target, _ = ds.load(3)
    assert target["captions"] == [ds.render(3)["caption"]] and target["label"] is None and img.size == (128, 128)
    assert ds.stats(max_samples=4)["captions_per_image"] == 1.0


def _caption_shard(path, keys, bad_key=None):
    with tarfile.open(path, "w") as tf:
        for n, key in enumerate(keys):
            buf = io.BytesIO()
            Image.new("RGB", (12, 10), (n * 9 % 255, 0, 0)).save(buf, "JPEG")
            img = b"broken" if key == bad_key else buf.getvalue()
            for name, data in ((f"{key}.jpg", img), (f"{key}.txt", f"red {key}\n\nsecond {key}\n".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_webdataset_caption_shards(tmp_path):
    for s in range(2):
        _caption_shard(tmp_path / f"pairs-{s}.tar", [f"s{s}_{i:02d}" for i in range(12)])
    pattern = str(tmp_path / "pairs-{0..1}.tar")
    for where in (pattern, str(tmp_path), str(tmp_path / "pairs-0.tar")):
        assert detect_task(where).task == "caption", where
    tr, va = (build_caption_dataset(pattern, s, val_fraction=0.3) for s in ("train", "val"))
    assert isinstance(tr, CaptionShards) and len(tr) + len(va) == 24 and len(va) > 0
    keys = {split: {c.split()[1] for c in ds.all_captions()} for split, ds in (("train", tr), ("val", va))}
    assert not keys["train"] & keys["val"]
    tf = CaptionTransform(8, train=False)
    seen = []
    for key, img, target, bad in tr.samples():
        out = tf(img, target, random.Random(0))
        assert out["captions"] == [f"red {key}", f"second {key}"] and out["caption"] == f"red {key}"
        assert out["image"].shape == (3, 8, 8) and out["label"] == -1 and bad == []
        seen.append(key)
    assert len(seen) == len(tr) and tr.classes is None
    (tmp_path / "labels").mkdir()
    with tarfile.open(tmp_path / "labels" / "cls-0.tar", "w") as t:
        for name, data in (("k.jpg", b"x"), ("k.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    assert detect_task(str(tmp_path / "labels")).task == "classify"  # class shards are not captions
    assert tr.stats()["captions_per_image"] == 2.0


@pytest.mark.peer("timm.data.transforms")
def test_caption_transform_crop_is_clips_and_flips_only_when_asked():
    """The training crop is open_clip's RandomResizedCrop(scale=(0.9, 1), bicubic) with no flip by default
    (timm's implementation as the reference), mirrored with hflip=1; a caption is drawn per sample,
    evaluation takes the first."""
    rrc = timm_transforms.RandomResizedCropAndInterpolation(24, scale=(0.9, 1.0), interpolation="bicubic")
    a = np.random.default_rng(0).integers(0, 255, (37, 50, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    caps = ["one", "two", "three"]
    tf = CaptionTransform(24, train=True)
    drawn = set()
    for seed in range(20):
        random.seed(seed)
        want = np.asarray(rrc(img)).transpose(2, 0, 1)
        out = tf(img, {"captions": caps, "label": 2, "image_id": 7}, random.Random(seed))
        assert np.array_equal(out["image"].numpy(), want), seed
        drawn.add(out["caption"])
        assert out["captions"] == caps and out["label"] == 2 and out["image_id"] == 7
        flipped = CaptionTransform(24, train=True, hflip=1.0)(img, {"captions": caps}, random.Random(seed))
        assert np.array_equal(flipped["image"].numpy(), want[:, :, ::-1]), seed
    assert drawn == set(caps)
    assert CaptionTransform(24, train=False, hflip=1.0).hflip == 0.0  # evaluation never flips
    ev = CaptionTransform(24, train=False)(img, {"captions": caps}, random.Random(1))
    # Shorter side to 24, centre crop: the middle rows of a plain bicubic resize to 32 x 24.
    ref = np.asarray(img.resize((32, 24), Image.Resampling.BICUBIC))[:, 4:28].transpose(2, 0, 1)
    assert ev["caption"] == "one" and ev["label"] == -1 and ev["image"].shape == (3, 24, 24)
    assert np.abs(ev["image"].numpy().astype(int) - ref).mean() < 3
    with pytest.raises(DataError, match="no caption"):
        tf(img, {"captions": []}, random.Random(0))


def test_prepare_data_caption_branch(tmp_path):
    root = _flickr_like(tmp_path, n=40)
    (root / "images" / "im07.png").write_bytes(b"not an image")
    stage = prepare_data(str(root), val_fraction=0.25)
    assert stage.task == "caption" and "captions.jsonl" in stage.reason
    assert stage.scan is not None and list(stage.scan.bad) == [str(root / "images" / "im07.png")]
    assert "checked 40 image files" in stage.scan_line()
    info = stage.info
    assert info.n_train + info.n_val == 39 and info.n_captions_train == 2 * info.n_train
    assert info.captions_per_image == 2.0 and info.typical_size == (30, 40) and info.classes is None
    assert info.in_chans == 3 and info.task == "caption"
    shapes = prepare_data("shapes-captions:30")
    assert shapes.info.classes == DEFAULT_CLASSES and shapes.info.captions_per_image == 5.0
    assert shapes.info.typical_size == (64, 64) and (shapes.info.n_train, shapes.info.n_val) == (30, 100)
    assert prepare_data("scenes:10", task="promptable").task == "promptable"  # instance masks have a reader
    assert prepare_data("shapes:20", task="generate").task == "classify"  # generators read class folders


def test_collate_captions_keeps_texts_as_lists():
    ds = build_caption_dataset("shapes-captions:8", "train")
    tf = CaptionTransform(32, train=True)
    samples = [tf(*ds.load(i)[:2], random.Random(i)) for i in range(4)]
    batch = collate_captions(samples)
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["caption"] == [s["caption"] for s in samples] and all(isinstance(c, str) for c in batch["caption"])
    assert batch["captions"] == [ds.load(i)[1]["captions"] for i in range(4)]
    assert batch["label"].tolist() == [0, 1, 2, 3] and batch["image_id"].tolist() == [0, 1, 2, 3]


def test_captions_summary_counts_captions_that_name_a_side():
    caps = [["A dog on the left .", "a cat"], ["Right , a man turns", "a bright light"], ["two birds"]]
    s = captions_summary(caps)
    assert s["sided_captions"] == 2 / 5  # "bright" and "birds" name no side
    assert s["captions_per_image"] == 5 / 3 and s["caption_words"] == np.mean([6, 2, 5, 3, 2])  # split on spaces
    assert captions_summary([])["sided_captions"] == 0.0
