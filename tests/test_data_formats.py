"""Dataset formats, odd image modes and bad files, written small into tmp_path."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from vitkit.data import (
    MAX_IMAGE_PIXELS,
    EvalTransform,
    ImageDataset,
    ShapesDataset,
    WebDatasetShards,
    build_dataset,
    build_loader,
    decode_image,
    inspect_dataset,
    is_system_path,
    scan_files,
)
from vitkit.errors import DataError, PathNotFoundError

CLASSES = ["cat", "dog", "fox"]


def _jpeg(colour=(200, 30, 30), size=(12, 10), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "JPEG")
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _write_tree(root, per_class=10, splits=("train", "val")):
    for split in splits:
        for k, c in enumerate(CLASSES):
            d = root / split / c if split else root / c
            d.mkdir(parents=True)
            for i in range(per_class):
                (d / f"{i}.jpg").write_bytes(_jpeg((40 * k, 10 * i, 100)))
    return root


def test_split_folder_tree(tmp_path):
    root = _write_tree(tmp_path / "ds", per_class=4)
    tr, va = build_dataset(str(root), "train"), build_dataset(str(root), "val")
    assert (len(tr), len(va), tr.classes, tr.format) == (12, 12, CLASSES, "folder")
    img, label = tr[5]
    assert img.mode == "RGB" and img.size == (12, 10) and label == 1
    assert tr.stats() == {"typical_size": (10, 12), "in_chans": 3, "num_classes": 3, "n": 12}
    gray = build_dataset(str(root), "train", in_chans=1)
    assert gray[0][0].mode == "L" and gray.in_chans == 1


def test_single_tree_split_is_stratified_and_stable(tmp_path):
    root = _write_tree(tmp_path / "ds", per_class=20, splits=(None,))
    tr = build_dataset(str(root), "train", val_fraction=0.25, seed=3)
    va = build_dataset(str(root), "val", val_fraction=0.25, seed=3)
    assert len(tr) == 45 and len(va) == 15
    assert np.bincount(va.targets).tolist() == [5, 5, 5]
    assert not set(tr.source.name(j) for j in tr.indices) & set(va.source.name(j) for j in va.indices)
    again = build_dataset(str(root), "val", val_fraction=0.25, seed=3)
    assert again.indices == va.indices
    assert build_dataset(str(root), "val", val_fraction=0.25, seed=4).indices != va.indices


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz"])
def test_tar_tree_read_without_extracting(tmp_path, suffix):
    root = _write_tree(tmp_path / "cifar", per_class=3)
    path = tmp_path / f"data{suffix}"
    with tarfile.open(path, "w:gz" if suffix != ".tar" else "w") as tf:
        tf.add(root, arcname="cifar")
    tr, va = build_dataset(str(path), "train"), build_dataset(str(path), "val")
    assert (len(tr), len(va), tr.classes, tr.format) == (9, 9, CLASSES, "tar")
    assert tr[4][0].size == (12, 10) and tr[4][1] == 1
    # Worker processes reopen the tar on their own.
    loader = build_loader(tr, 3, train=False, transform=EvalTransform(8, crop_pct=1.0), num_workers=2)
    labels = np.concatenate([b["label"].numpy() for b in loader])
    assert labels.tolist() == tr.targets


def test_cifar_pickles(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 6)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": list(range(n))}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{k}".encode() for k in range(10)]}, f)
    tr, va = build_dataset(str(tmp_path), "train"), build_dataset(str(tmp_path), "val")
    assert (len(tr), len(va), tr.format, tr.classes[3]) == (20, 6, "cifar10", "c3")
    with open(root / "test_batch", "rb") as f:
        first = pickle.load(f)[b"data"][0]
    img, label = va[0]
    assert img.size == (32, 32) and label == 0
    np.testing.assert_array_equal(np.asarray(img)[..., 0].ravel(), first[:1024])

    c100 = tmp_path / "c100" / "cifar-100-python"
    c100.mkdir(parents=True)
    for name in ("train", "test"):
        with open(c100 / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (5, 3072), dtype=np.uint8), b"fine_labels": [0, 1, 2, 3, 99]}, f)
    ds = build_dataset(str(tmp_path / "c100"), "train")
    assert ds.format == "cifar100" and ds.num_classes == 100


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


@pytest.mark.parametrize("gz", [True, False])
def test_idx(tmp_path, gz):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 7), ("t10k", 3)):
        imgs, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8)
        for kind, arr in (("images-idx3", imgs), ("labels-idx1", labels)):
            name = tmp_path / f"{prefix}-{kind}-ubyte"
            if gz:
                with gzip.open(f"{name}.gz", "wb") as f:
                    f.write(_idx(arr))
            else:
                name.write_bytes(_idx(arr))
        if prefix == "t10k":
            last = imgs
    va = build_dataset(str(tmp_path), "val", in_chans=1)
    assert (len(va), va.format, va.num_classes, va[2][1]) == (3, "idx", 10, 2)
    np.testing.assert_array_equal(np.asarray(va[2][0]), last[2])
    assert build_dataset(str(tmp_path), "train")[0][0].mode == "RGB"


@pytest.mark.parametrize("kind", ["csv", "csv-header", "jsonl", "csv-int"])
def test_listings(tmp_path, kind):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(12):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg())
        rows.append((f"img/{i}.jpg", CLASSES[i % 3]))
    if kind == "jsonl":
        path = tmp_path / "list.jsonl"
        path.write_text("\n".join(json.dumps({"path": p, "label": y}) for p, y in rows) + "\n")
    else:
        path = tmp_path / "list.csv"
        lines = [f"{p},{CLASSES.index(y) if kind == 'csv-int' else y}" for p, y in rows]
        path.write_text("\n".join((["path,label"] if kind == "csv-header" else []) + lines) + "\n")
    tr = build_dataset(str(path), "train", val_fraction=0.25)
    va = build_dataset(str(path), "val", val_fraction=0.25)
    assert len(tr) + len(va) == 12 and len(va) == 3
    assert tr.classes == (["0", "1", "2"] if kind == "csv-int" else CLASSES)
    assert tr[0][0].size == (12, 10)


def _write_shard(path, keys, start_label=0, bad_key=None):
    with tarfile.open(path, "w") as tf:
        for n, key in enumerate(keys):
            img = b"not an image" if key == bad_key else _png(Image.new("RGB", (8, 8), (n, 0, 0)))
            for name, data in ((f"{key}.png", img), (f"{key}.cls", str((start_label + n) % 3).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
    for s in range(4):
        _write_shard(tmp_path / f"shards-{s:03d}.tar", [f"s{s}_{i:03d}" for i in range(5)], start_label=s)
    ds = build_dataset(str(tmp_path / "shards-{000..003}.tar"), "train", val_fraction=0.3)
    va = build_dataset(str(tmp_path / "shards-{000..003}.tar"), "val", val_fraction=0.3)
    assert isinstance(ds, WebDatasetShards) and ds.num_classes == 3
    assert len(ds) + len(va) == 20 and len(va) > 0
    assert len(list(ds)) == len(ds)
    folder = build_dataset(str(tmp_path), "train", val_fraction=0.3)
    assert isinstance(folder, WebDatasetShards) and len(folder) == len(ds)
    single = build_dataset(str(tmp_path / "shards-000.tar"), "train", val_fraction=0.3)
    assert isinstance(single, WebDatasetShards)
    # Split across 2 workers by shard: every sample exactly once.
    loader = build_loader(ds, 4, train=True, transform=EvalTransform(8, crop_pct=1.0), num_workers=2)
    seen = [int(x) for b in loader for x in b["image"][:, 0, 0, 0]]
    assert len(seen) == len(ds) // 4 * 4 or len(seen) == len(ds)
    full = build_loader(ds, 4, train=False, transform=EvalTransform(8, crop_pct=1.0), num_workers=3)
    assert sum(len(b["label"]) for b in full) == len(ds)


def test_webdataset_bad_member_skipped(tmp_path, caplog):
    _write_shard(tmp_path / "a.tar", [f"k{i}" for i in range(60)], bad_key="k5")
    ds = build_dataset(str(tmp_path / "a.tar"), "train", val_fraction=0.01)
    loader = build_loader(ds, 8, train=False, transform=EvalTransform(8, crop_pct=1.0))
    n = sum(len(b["label"]) for b in loader)
    # The broken image is replaced by a neighbour, so the count stays what len() promised.
    assert loader.skips.skipped == 1 and n == len(ds) == 59
    assert [r.getMessage().split(":")[-2] for r in caplog.records] == ["k5"]


def test_unknown_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected"):
        build_dataset(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        build_dataset(str(tmp_path / "empty"))
    (tmp_path / "x.bin").write_bytes(b"123")
    with pytest.raises(ValueError, match="no supported type"):
        build_dataset(str(tmp_path / "x.bin"))
    with pytest.raises(ValueError, match="shapes:N"):
        build_dataset("shapes:abc")
    with pytest.raises(ValueError, match="split"):
        build_dataset("shapes", "test")


def test_shapes_via_build_and_inspect(tmp_path):
    ds = build_dataset("shapes:60", "train")
    assert isinstance(ds, ShapesDataset) and len(ds) == 60 and isinstance(ds, ImageDataset)
    info = inspect_dataset("shapes:60")
    assert (info.num_classes, info.in_chans, info.typical_size, info.n_train, info.format) == (6, 3, (64, 64), 60, "shapes")
    root = tmp_path / "gray"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(5):
            size = (20, 30) if i < 3 else (50, 60)
            Image.new("L", size, 10 * i).save(root / c / f"{i}.png")
    info = inspect_dataset(str(root))
    assert (info.in_chans, info.typical_size, info.num_classes, info.n_train + info.n_val) == (1, (30, 20), 3, 15)


# ---- odd images ---------------------------------------------------------------------------------


def test_image_modes_convert():
    i16 = Image.fromarray(np.array([[0, 65535], [257 * 100, 32768]], dtype=np.uint16))
    assert np.asarray(decode_image(_png(i16), 1)).tolist() == [[0, 255], [100, 128]]
    assert decode_image(_png(i16), 3).mode == "RGB"

    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    assert np.asarray(decode_image(_png(rgba), 3)).tolist() == [[[255, 255, 255], [0, 0, 255]]]

    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (50, 255))
    assert np.asarray(decode_image(_png(la), 1)).tolist() == [[255, 50]]

    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    assert np.asarray(decode_image(_png(pal), 3)).tolist() == [[[255, 255, 255], [10, 200, 30]]]

    cmyk = decode_image(_jpeg((0, 255, 255, 0), mode="CMYK"), 3)
    r, g, b = np.asarray(cmyk)[5, 5]
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60
    assert decode_image(_jpeg(), 1).mode == "L"
    f = Image.fromarray(np.array([[0.0, 1.0]], dtype=np.float32), "F")
    buf = io.BytesIO()
    f.save(buf, "TIFF")
    assert np.asarray(decode_image(buf.getvalue(), 1)).tolist() == [[0, 255]]


def _tree_with_bad(root, n_good=97, bad=()):
    d = root / "a"
    d.mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(n_good):
        (root / ("a" if i % 2 else "b") / f"{i:03d}.jpg").write_bytes(_jpeg())
    for name, data in bad:
        (d / name).write_bytes(data)
    return root


BAD = (
    ("zz_empty.jpg", b""),
    ("zz_text.jpg", b"hello, I am not a picture\n"),
    ("zz_truncated.jpg", _jpeg(size=(64, 64))[:200]),
)


def test_bad_files_skipped_and_counted(tmp_path, caplog):
    root = _tree_with_bad(tmp_path / "ds", bad=BAD)
    ds = build_dataset(str(root), "train", val_fraction=0.01)
    loader = build_loader(ds, 10, train=False, transform=EvalTransform(8, crop_pct=1.0), num_workers=2)
    batches = list(loader)
    # One clean log line per broken file, however often the stand-in search met it.
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3 and all(m.startswith("skipping broken file ") for m in logged)
    assert all(len(b["label"]) == 10 for b in batches[:-1])
    assert sum(len(b["label"]) for b in batches) == len(ds)
    summary = loader.skips.summary()
    assert sum(int(b["skipped"].sum()) for b in batches) >= summary["skipped"] == 3
    assert {n.split("/")[-1].split(":")[0] for n in summary["bad_files"]} == {
        "zz_empty.jpg", "zz_text.jpg", "zz_truncated.jpg"
    }
    img, _ = ds[[ds.source.name(j) for j in ds.indices].index(str(root / "a" / "zz_empty.jpg"))]
    assert img.size == (12, 10)


def test_too_many_bad_files_raise(tmp_path):
    bad = [(f"bad{i}.jpg", b"junk") for i in range(10)]
    root = _tree_with_bad(tmp_path / "ds", n_good=50, bad=bad)
    ds = build_dataset(str(root), "train", val_fraction=0.01)
    loader = build_loader(ds, 20, train=False, transform=EvalTransform(8, crop_pct=1.0))
    with pytest.raises(DataError, match="(?s)bad0.jpg.*raise data.max_bad_fraction"):
        list(loader)


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS <= 8192 * 8192
    data = _png(Image.new("L", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # warning zone (1x..2x) and error zone
    from vitkit.data import BadImageError

    with pytest.raises(BadImageError, match="decompression bomb"):
        decode_image(data, 3, name="bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with pytest.raises(BadImageError, match="bomb.png"):
        decode_image(data, 3, name="bomb.png")


# ---- system files, the up-front scan, hostile and corrupt inputs ----------------------------------

_CLUTTER = ("._0.jpg", ".DS_Store", "Thumbs.db", "desktop.ini", "notes.txt")


def _add_clutter(root):
    """macOS/Windows/Jupyter clutter: none of it may become data, a class, or change the split layout."""
    for c in ("cat", "dog"):
        for name in _CLUTTER:
            (root / "train" / c / name).write_bytes(b"\x00\x05\x16\x07junk")
    (root / "__MACOSX" / "train" / "cat").mkdir(parents=True)
    (root / "__MACOSX" / "train" / "cat" / "._0.jpg").write_bytes(b"junk")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "x.jpg").write_bytes(_jpeg())
    (root / ".DS_Store").write_bytes(b"junk")


def test_system_files_ignored_in_folders_and_tars(tmp_path):
    root = _write_tree(tmp_path / "ds", per_class=4)
    _add_clutter(root)
    tr, va = build_dataset(str(root), "train"), build_dataset(str(root), "val")
    assert tr.classes == CLASSES and (len(tr), len(va)) == (12, 12)
    assert not any("._" in tr.source.name(j) or "MACOSX" in tr.source.name(j) for j in tr.indices)
    assert scan_files([tr, va]).bad == {}  # clutter and notes.txt are not broken images: never read
    tar = tmp_path / "ds.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(root, arcname="ds")
    t_tr = build_dataset(str(tar), "train")
    assert t_tr.classes == CLASSES and len(t_tr) == 12
    assert is_system_path("a/__MACOSX/b.jpg") and is_system_path("._x.jpg") and not is_system_path("a/b.jpg")


def test_system_rows_and_shards_ignored(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for k, c in enumerate(CLASSES * 4):
        (tmp_path / "img" / f"{k}.jpg").write_bytes(_jpeg())
        rows.append(f"img/{k}.jpg,{c}")
    rows.append("img/._0.jpg,cat")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    tr, va = build_dataset(str(tmp_path / "list.csv"), "train"), build_dataset(str(tmp_path / "list.csv"), "val")
    assert len(tr) + len(va) == 12
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "train-000.tar", [f"k{i}" for i in range(6)])
    (shards / "._train-000.tar").write_bytes(b"junk")  # would raise as a corrupt tar if read
    assert isinstance(build_dataset(str(shards), "train"), WebDatasetShards)


def test_scan_counts_each_bad_file_once_and_excludes_it(tmp_path):
    root = _tree_with_bad(tmp_path / "ds", bad=BAD)
    tr = build_dataset(str(root), "train", val_fraction=0.2)
    va = build_dataset(str(root), "val", val_fraction=0.2)
    report = scan_files([tr, va, tr], max_bad_fraction=0.05)  # a dataset passed twice counts once
    assert report.scanned == 100 and sorted(n.rsplit("/", 1)[-1] for n in report.bad_files) == [
        "zz_empty.jpg", "zz_text.jpg", "zz_truncated.jpg"
    ]
    assert all(line.startswith(name) for line, name in zip(report.lines(), report.bad_files, strict=True))
    n_tr, n_va = len(tr), len(va)
    tr.exclude(report.bad_files)
    va.exclude(report.bad_files)
    assert len(tr.bad_files) + len(va.bad_files) == 3 and len(tr) + len(va) == n_tr + n_va - 3
    loader = build_loader(tr, 10, train=False, transform=EvalTransform(8, crop_pct=1.0))
    assert sum(int(b["skipped"].sum()) for b in loader) == 0 and loader.skips.skipped == 0
    # The threshold is judged on the whole dataset: 3 of 100 is over 2%.
    only_bad = str(_tree_with_bad(tmp_path / "bad", n_good=0, bad=BAD))
    with pytest.raises(DataError, match="none of the 3 image files can be read"):  # whatever the threshold
        scan_files([build_dataset(only_bad, s, val_fraction=0.5) for s in ("train", "val")], max_bad_fraction=1.0)
    with pytest.raises(DataError, match=r"3 of 100 image files \(3.0%\).*data.max_bad_fraction=0.02"):
        scan_files([tr.__class__(tr.source, [0] * len(tr.source), ["a"]), va], max_bad_fraction=0.02)


def test_malicious_cifar_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": [0]}, f)
    with pytest.raises(DataError, match="refused to load io.open"):
        build_dataset(str(tmp_path), "train")
    assert not marker.exists()


def test_corrupt_and_missing_inputs_raise_vitkit_errors(tmp_path):
    tgz = tmp_path / "data.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("a/0.jpg")
        data = _jpeg() * 50
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    tgz.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        build_dataset(str(tgz), "train")
    with pytest.raises(PathNotFoundError, match="no such file or folder"):
        build_dataset(str(tmp_path / "owner" / "name"), "train")


def _shards(tmp_path, sizes, bad_keys=()):
    paths = []
    for s, n in enumerate(sizes):
        keys = [f"s{s}_{i:03d}" for i in range(n)]
        paths.append(str(tmp_path / f"shard-{s}.tar"))
        with tarfile.open(paths[-1], "w") as tf:
            for k, key in enumerate(keys):
                img = b"broken" if key in bad_keys else _png(Image.new("RGB", (8, 8), (s, k, 0)))
                for name, data in ((f"{key}.png", img), (f"{key}.cls", str(k % 3).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return paths


def test_webdataset_is_lazy_and_indexes_headers_only(tmp_path, monkeypatch):
    import vitkit.data.webdataset as wds

    paths = _shards(tmp_path, [7, 5])
    monkeypatch.setattr(wds, "_shard_index", lambda *a: pytest.fail("the constructor read a shard"))
    ds = WebDatasetShards(paths, num_classes=3)
    monkeypatch.undo()
    monkeypatch.setattr(wds, "decode_image", lambda *a, **k: pytest.fail("indexing decoded an image"))
    assert len(ds) == 12 and ds.num_classes == 3 and WebDatasetShards(paths).num_classes == 3


@pytest.mark.parametrize("workers, train", [(0, True), (2, True), (3, False)])
def test_webdataset_loader_len_matches_what_it_yields_per_rank(tmp_path, workers, train):
    paths = _shards(tmp_path, [9, 5, 6, 7], bad_keys={"s1_004"})  # the broken one is its shard's last
    per_rank = []
    for rank in range(2):
        ds = WebDatasetShards(paths)
        ds.world = (2, rank)  # as if under torchrun with 2 processes
        loader = build_loader(ds, 2, train=train, transform=EvalTransform(8, crop_pct=1.0), num_workers=workers,
                              max_bad_fraction=0.5)
        batches = list(loader)
        assert len(batches) == len(loader) > 0
        per_rank.append(sum(len(b["label"]) for b in batches))
        if rank == 1 and workers == 0:
            assert loader.skips.skipped == 1  # reported although no good sample follows it
    # Rank 0 reads shards 0 and 2 (15 samples), rank 1 shards 1 and 3 (12): both yield 12.
    assert per_rank[0] == per_rank[1] and (not train or per_rank[0] <= 12)
    ds = WebDatasetShards(paths[:3])
    ds.world = (2, 0)
    with pytest.raises(DataError, match="3 shards cannot be split evenly over 2 processes"):
        len(build_loader(ds, 2, train=True, transform=EvalTransform(8, crop_pct=1.0)))


def test_webdataset_set_epoch_reshuffles_shards(tmp_path):
    ds = WebDatasetShards(_shards(tmp_path, [3] * 6), shuffle=True)
    order = {}
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        order.setdefault(epoch, []).append([key.split("_")[0] for key, *_ in ds.samples()])
    assert order[0][0] == order[0][1] and order[0][0] != order[1][0]
    assert sorted(order[0][0]) == sorted(order[1][0])


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_cifar_batches_of_any_pickle_protocol_load(tmp_path, protocol):
    """Python 2 era batches (protocol 2, bytes via _codecs) and new ones (out-of-band-capable 5) alike."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    data = np.arange(2 * 3072, dtype=np.uint64).astype(np.uint8).reshape(2, 3072)
    for name in ("data_batch_1", "test_batch"):
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": b"batch", b"data": data, b"labels": [3, 1], b"filenames": [b"a", b"b"]}, f,
                        protocol=protocol)
    ds = build_dataset(str(tmp_path), "train")
    assert ds.targets == [3, 1]
    np.testing.assert_array_equal(np.asarray(ds[1][0])[..., 0].ravel(), data[1, :1024])


def test_data_stage_reports_the_split_it_uses(tmp_path):
    """val_fraction=0.3 on a class folder: DatasetInfo and run.json count the split the run uses
    (30% per class, broken files left out), not a default 10% split."""
    from vitkit.config import load_config
    from vitkit.data import prepare_data
    from vitkit.train import build_run

    root = _write_tree(tmp_path / "ds", per_class=20, splits=(None,))
    (root / CLASSES[0] / "zz_broken.jpg").write_bytes(b"not a picture")
    stage = prepare_data(str(root), val_fraction=0.3, seed=0, max_bad_fraction=0.2)
    assert len(stage.scan.bad) == 1 and stage.in_chans == 3
    n_train, n_val = stage.info.n_train, stage.info.n_val
    assert (n_train, n_val) == (len(stage.train), len(stage.val)) and n_train + n_val == 60
    assert n_val in (17, 18)  # 6 of each class's 20-21 files (a 10% split would hold 6 in all)
    assert sum(stage.info.class_counts) == n_train and np.bincount(stage.train.targets).tolist() == list(
        stage.info.class_counts)

    cfg = load_config(overrides=[
        "model.name=test_vit", f"data.path={root}", "data.img_size=32", "data.batch_size=8", "data.num_workers=0",
        "data.val_fraction=0.3", "data.max_bad_fraction=0.2", "engine.epochs=1", f"engine.out_dir={tmp_path / 'run'}",
    ])
    trainer, run_info = build_run(cfg, verbose=False)
    assert (run_info["n_train"], run_info["n_val"]) == (n_train, n_val) == (
        len(trainer.train_loader.dataset), len(trainer.val_loader.dataset))
    assert list(run_info["class_counts"].values()) == list(stage.info.class_counts)
    assert len(run_info["bad_files"]) == 1
