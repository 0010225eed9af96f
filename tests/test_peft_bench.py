"""The PEFT transfer benchmark's helpers: target sets built from files on disk, per-process peak memory,
step time from the logs, merged rows and the goal computed from them (no training here)."""

from __future__ import annotations

import gzip
import importlib
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitkit.data import build_dataset

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def pt():
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("peft_transfer")
    finally:
        sys.path.remove(str(BENCH))


def _pngs(folder: Path) -> dict[str, list[np.ndarray]]:
    return {d.name: [np.asarray(Image.open(f)) for f in sorted(d.glob("*.png"))] for d in sorted(folder.iterdir())}


def test_balanced_pick_fills_evenly_and_is_seeded(pt):
    by_class = {"a": list(range(5)), "b": list(range(100, 150)), "c": list(range(200, 250))}
    got = pt.balanced_pick(by_class, 60, np.random.default_rng(0))
    # Water filling: the small class gives all it has, the other two split the remaining 55.
    assert len(got["a"]) == 5 and sorted(len(got[c]) for c in "bc") == [27, 28]
    assert all(len(set(v)) == len(v) and set(v) <= set(by_class[c]) for c, v in got.items())
    assert got == pt.balanced_pick(by_class, 60, np.random.default_rng(0))
    assert got != pt.balanced_pick(by_class, 60, np.random.default_rng(1))
    assert sum(map(len, pt.balanced_pick(by_class, 500, np.random.default_rng(0)).values())) == 105


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_target_is_a_seeded_subset_and_the_whole_test_set(pt, tmp_path):
    src = tmp_path / "fm"
    src.mkdir()
    rng = np.random.default_rng(5)
    train_x, train_y = rng.integers(0, 256, (60, 28, 28)), np.arange(60) % 10  # 6 per class
    test_x, test_y = rng.integers(0, 256, (30, 28, 28)), np.arange(30) % 10
    for prefix, x, y in (("train", train_x, train_y), ("t10k", test_x, test_y)):
        _write_idx(src / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", y)
    dest = pt.materialise("fashion", 20, 0, n_test=10000, cache=tmp_path / "cache", fashion=src)
    train, test = _pngs(dest / "train"), _pngs(dest / "test")
    names = list(pt.FASHION_CLASSES)
    assert sorted(train) == sorted(names) and all(len(v) == 2 for v in train.values())
    for cls, images in train.items():  # each picture is one of its class's source images, pixel for pixel
        pool = train_x[train_y == names.index(cls)]
        assert all(any(np.array_equal(img, s) for s in pool) for img in images)
    assert sum(map(len, test.values())) == 30 and all(len(v) == 3 for v in test.values())
    meta = json.loads((dest / "target.json").read_text())
    assert meta["n_train"] == 20 and meta["n_test"] == 30
    # vitkit reads train/ as the training split and test/ as the run's val split
    assert len(build_dataset(str(dest), "train")) == 20 and len(build_dataset(str(dest), "val")) == 30
    # built once: a second call reuses the folder; another seed draws other images
    mtime = (dest / "target.json").stat().st_mtime_ns
    assert pt.materialise("fashion", 20, 0, n_test=10000, cache=tmp_path / "cache", fashion=src) == dest
    assert (dest / "target.json").stat().st_mtime_ns == mtime
    other = pt.materialise("fashion", 20, 1, n_test=10000, cache=tmp_path / "cache", fashion=src)
    def flat(tree):
        return sorted(img.tobytes() for v in tree.values() for img in v)

    assert flat(_pngs(other / "train")) != flat(train)


def test_shapes_test_set_shares_no_image_with_training(pt, tmp_path):
    dest = pt.materialise("shapes", 18, 0, n_test=18, cache=tmp_path)
    train, test = _pngs(dest / "train"), _pngs(dest / "test")
    assert all(len(v) == 3 for v in train.values()) and len(train) == 6 and sorted(test) == sorted(train)
    seen = {img.tobytes() for v in train.values() for img in v}
    assert not any(img.tobytes() in seen for v in test.values() for img in v)
    assert all(img.shape == (32, 32, 3) for v in train.values() for img in v)


def _camvid(root: Path, n_photos: int = 4) -> Path:
    """Photos 64x32: the left half Sky (0), the right half Road (3); one more photo all void."""
    (root / "classes.txt").parent.mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol",
                                                 "Fence", "Car", "Pedestrian", "Bicyclist"]) + "\n")
    half = np.zeros((32, 64), np.uint8)
    half[:, 32:] = 3
    for split in ("train", "val"):
        (root / split).mkdir()
        (root / f"{split}annot").mkdir()
        for k in range(n_photos + 1):
            pixels = np.random.default_rng(k).integers(0, 256, (32, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"p{k}.jpg")
            mask = half if k < n_photos else np.full((32, 64), 11, np.uint8)
            Image.fromarray(mask).save(root / f"{split}annot" / f"p{k}.png")
    return root


def test_camvid_crops_take_the_class_covering_60_percent(pt, tmp_path):
    root = _camvid(tmp_path / "camvid")
    classes = (root / "classes.txt").read_text().split()
    crops = pt.camvid_crops(pt.pairs(root, "train"), 50, np.random.default_rng(0), classes)
    # A crop at x covers 32 - x Sky columns of 32: Sky when x <= 12, Road when x >= 20, neither between;
    # the all-void photo gives none.
    assert set(crops) == {"Sky", "Road"}
    assert all(x <= 12 for _, x, _ in crops["Sky"]) and all(x >= 20 for _, x, _ in crops["Road"])
    assert all(img.name != "p4.jpg" for v in crops.values() for img, _, _ in v)
    dest = pt.materialise("camvid", 30, 0, n_test=20, cache=tmp_path / "cache", camvid=root)
    train = _pngs(dest / "train")
    assert sorted(train) == ["Road", "Sky"] and [len(v) for v in train.values()] == [15, 15]
    assert all(img.shape == (32, 32, 3) for v in train.values() for img in v)
    meta = json.loads((dest / "target.json").read_text())
    assert len(meta["classes_left_out"]) == 9 and meta["n_test"] == 20
    assert build_dataset(str(dest), "val").classes == ["Road", "Sky"]


def test_run_child_measures_each_process_on_its_own(pt, tmp_path):
    big = pt.run_child([sys.executable, "-c", "b = b'x' * (300 << 20)"], tmp_path / "big.log")
    small = pt.run_child([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / "small.log")
    assert big[0] == 0 and big[2] >= 300
    # Not the largest child so far (RUSAGE_CHILDREN), nor this test process's size (a plain fork + exec from
    # it starts at pytest's resident size, torch loaded)
    assert small[0] == 3 and small[2] < 100


def test_step_ms_is_the_median_logged_step_after_warmup(pt, tmp_path):
    lines = [{"kind": "train", "step": 50, "img_per_s": 10.0}, {"kind": "val", "step": 50, "acc1": 0.5}]
    lines += [{"kind": "train", "step": s, "img_per_s": r} for s, r in ((100, 100.0), (150, 400.0), (200, 200.0))]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    assert pt.step_ms(tmp_path / "metrics.jsonl", 32) == pytest.approx(1000 * 32 / 200)
    assert pt.step_ms(tmp_path / "missing.jsonl", 32) is None


def test_trainable_counts_of_full_fine_tuning(pt):
    from vitkit.models import create_model

    model = create_model("vit_tiny_patch16_224", num_classes=7)
    c = pt.trainable_counts(model, {})
    assert c["head_params"] == 192 * 7 + 7
    assert c["trainable_params"] == c["base_params"] == 5_717_416 - (192 * 1000 + 1000)  # ViT-Ti minus its 1k head
    assert c["trainable_pct"] == 100


def _row(target, method, acc, pct, ms=10.0, mem=500.0):
    return {"target": target, "method": method, "acc": acc, "trainable_pct": pct, "step_ms": ms, "peak_mem_mb": mem,
            "budget_s": 240.0, "trainable_params": int(pct * 1000) + 1, "head_params": 100, "base_params": 100_000}


def test_merged_rows_and_the_goal(pt, tmp_path):
    rows = [_row("a", "full", 0.90, 100, 20, 900), _row("b", "full", 0.80, 100, 20, 900),
            _row("a", "lora", 0.895, 0.5, 12, 700), _row("b", "lora", 0.70, 0.5, 12, 700),
            _row("a", "partial", 0.95, 20), _row("b", "partial", 0.95, 20),  # above 2%: not a candidate
            _row("a", "linear", 0.5, 0.0), _row("b", "linear", 0.5, 0.0), _row("a", "bitfit", 0.99, 0.1)]
    rows = pt.merge_rows(rows, [_row("b", "lora", 0.795, 0.5, 12, 700)])  # a rerun replaces its row
    assert len(rows) == 9 and [r["acc"] for r in rows if r["target"] == "b" and r["method"] == "lora"] == [0.795]
    s = pt.summarise(rows)
    assert set(s["mean_over_targets"]) == {"full", "linear", "lora", "partial"}  # bitfit lacks target b
    g = s["goal"]
    assert g["best_peft"] == "lora" and g["gap_points"] == pytest.approx(0.5)
    assert g["within_1_point"] and g["faster_than_full"] and g["less_memory_than_full"] and g["met"]
    slower = pt.summarise(pt.merge_rows(rows, [_row("a", "lora", 0.895, 0.5, 30, 700)]))
    assert not slower["goal"]["met"] and slower["goal"]["within_1_point"]
    result = {"rows": rows, "summary": s, "source": {"model": "m", "pretraining": {"data": "/x/cifar10.tar.gz"}}}
    pt.plot(result, tmp_path / "peft.png")
    assert Image.open(tmp_path / "peft.png").size[0] > 500


def test_source_needs_its_run_config(pt, tmp_path):
    weights = tmp_path / "run" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"not read")
    with pytest.raises(SystemExit, match="config.yaml"):
        pt.describe_source(weights)
    (tmp_path / "run" / "run.json").write_text("{}")
    (tmp_path / "run" / "config.yaml").write_text(
        "model: {name: vit_nano_convstem_patch8_64, args: {stem_width: 192}}\n"
        "data: {path: /d/cifar10-jpg.tar.gz, img_size: 32, in_chans: 3}\n"
        "engine: {time_budget: 30m}\nobjective: {name: supervised}\n")
    src = pt.describe_source(weights)
    assert src["train_args"] == ["model.name=vit_nano_convstem_patch8_64", "data.img_size=32", "data.in_chans=3",
                                 "model.args.stem_width=192"]
    assert len(src["sha256"]) == 64 and src["pretraining"]["time_budget"] == "30m"
