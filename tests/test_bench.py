"""`vitkit bench` and its library function: sane numbers on a tiny model, side by side with timm; the
helpers of the defaults and plan-sweep benchmark scripts (data builders, scores, rows, the search)."""

import importlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_vitkit as vitkit
from PIL import Image

from vitkit import create_model
from vitkit.cli.bench import _int_list
from vitkit.efficient.bench import BenchConfig, bench, format_table
from vitkit.efficient.memory import peak_forward_bytes
from vitkit.errors import ConfigError
from vitkit.models.info import count_flops

FAST = dict(warmup=1, reps=3, threads=2)


def test_bench_rows_are_sane():
    result = bench("test_vit", BenchConfig(batches=(1, 4), precisions=("fp32", "bf16"), **FAST))
    rows = result["rows"]
    assert [(r["precision"], r["batch"]) for r in rows] == [("fp32", 1), ("fp32", 4), ("bf16", 1), ("bf16", 4)]
    with torch.device("meta"):
        flops = count_flops(create_model("test_vit"), (3, 32, 32)) / 1e9
    for r in rows:
        assert r["img_s"] > 0 and len(r["runs_img_s"]) == 3
        assert r["gflops_per_img"] == pytest.approx(flops, rel=1e-3)
        assert r["achieved_gflops_s"] == pytest.approx(r["gflops_per_img"] * r["img_s"], rel=1e-2)
        # The share of the measured matmul peak (itself load-dependent on a shared machine, so no upper bound).
        peak = result["matmul_peak_gflops_s"][r["precision"]]
        assert r["frac_of_matmul_peak"] == pytest.approx(r["achieved_gflops_s"] / peak, rel=1e-2)
        assert r["peak_mem_mb"] > 0
        if r["batch"] == 1:
            assert 0 < r["latency_ms_p50"] <= r["latency_ms_p95"]
        else:
            assert r["latency_ms_p50"] is None
    assert set(result["matmul_peak_gflops_s"]) == {"fp32", "bf16"}
    assert "img/s" in format_table(result)


def test_bench_tome_lowers_flops():
    plain = bench("test_vit", BenchConfig(batches=(2,), img_size=64, **FAST))
    merged = bench("test_vit", BenchConfig(batches=(2,), img_size=64, tome=16, **FAST))
    assert merged["rows"][0]["gflops_per_img"] < 0.85 * plain["rows"][0]["gflops_per_img"]
    assert merged["tome_r"] == 16


@pytest.mark.peer("timm")
def test_bench_vs_timm_side_by_side():
    result = bench("vit_tiny_patch16_224", BenchConfig(batches=(2,), img_size=32, vs_timm=True, **FAST))
    ours, theirs = result["rows"]
    assert (ours["impl"], theirs["impl"]) == ("vitkit", "timm")
    assert ours["ratio_vs_timm"] == pytest.approx(ours["img_s"] / theirs["img_s"], rel=1e-3)
    assert ours["gflops_per_img"] == pytest.approx(theirs["gflops_per_img"], rel=0.02)
    with pytest.raises(ConfigError, match="timm has no model"):
        bench("vit_nano_convstem_patch4_32", BenchConfig(batches=(1,), vs_timm=True, **FAST))


@pytest.mark.peer("timm")  # timm's Swin keeps its classifier as head.fc
def test_bench_vs_timm_loads_a_nested_timm_classifier():
    result = bench("swin_tiny_patch4_window7_224", BenchConfig(batches=(1,), vs_timm=True, **FAST))
    ours, theirs = result["rows"]
    assert ours["gflops_per_img"] == pytest.approx(theirs["gflops_per_img"], rel=0.02)


def test_peak_memory_counts_weights_and_live_activations():
    model = torch.nn.Linear(1024, 256)
    x = torch.randn(512, 1024)
    weights = (1024 * 256 + 256) * 4
    peak = peak_forward_bytes(model, x, lambda inp: model(inp))
    out_bytes = 512 * 256 * 4
    assert weights + out_bytes <= peak <= weights + 3 * out_bytes
    assert count_flops(model, x) == 2 * 512 * 1024 * 256


def test_bench_command_json_and_errors():
    r = vitkit("bench", "test_vit", "--batch", "1,2", "--precision", "fp32", "--reps", "2", "--warmup", "1",
               "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["model"] == "test_vit" and result["input_size"] == [3, 32, 32]
    assert [row["batch"] for row in result["rows"]] == [1, 2]
    assert all(row["img_s"] > 0 for row in result["rows"])
    r = vitkit("bench", "test_vit", "--precision", "fp8")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "vitkit bench: error:" in r.stderr, r.stderr
    r = vitkit("bench", "no_such_model")
    assert r.returncode == 2 and "unknown model" in r.stderr


def test_bench_bad_batches_are_config_errors():
    with pytest.raises(ConfigError, match="comma-separated"):
        _int_list("1,x")
    with pytest.raises(ConfigError, match="batch sizes"):
        bench("test_vit", BenchConfig(batches=(0,), **FAST))


# ---- benchmarks/defaults.py and benchmarks/plan_sweep.py: their helpers (no training here) ----------------

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def dflt():
    return _bench_module("defaults")


@pytest.fixture(scope="module")
def sweep():
    return _bench_module("plan_sweep")


def test_defaults_longtail_counts_follow_the_geometric_profile(dflt):
    # n_c proportional to 10^(-c/9): sum of the weights 4.086952, so 5,000 images give the first class
    # 1223.4 and the last 122.3; 100 images give 24.47, 18.94, 14.67, 11.36, 8.79, 6.81, 5.27, 4.08, 3.16,
    # 2.45, floored to 95 and the 5 left over going to the largest fractions (.94, .81, .79, .67, .47).
    weights = [10 ** (-c / 9) for c in range(10)]
    counts = dflt.longtail_counts(10, 10.0, 5000)
    assert sum(counts) == 5000 and counts == sorted(counts, reverse=True)
    assert all(abs(n - 5000 * w / sum(weights)) < 1 for n, w in zip(counts, weights))
    assert counts[0] in (1223, 1224) and counts[-1] in (122, 123)
    assert dflt.longtail_counts(10, 10.0, 100) == [25, 19, 15, 11, 9, 7, 5, 4, 3, 2]
    # the test profile with the first class's share at most 1,000 (1000 x 4.086952) or 20 (81.7)
    assert dflt.longtail_total(10, 10.0, 1000) == 4086 and dflt.longtail_total(10, 10.0, 20) == 81
    assert dflt.longtail_counts(10, 10.0, 4086)[0] <= 1000


def test_defaults_pick_counts_is_seeded_and_exact(dflt):
    labels = np.array([0, 1, 2] * 10 + [0] * 5)  # 15, 10 and 10 of the three classes
    keep = dflt.pick_counts(labels, [3, 0, 10], np.random.default_rng(0))
    assert np.bincount(labels[keep], minlength=3).tolist() == [3, 0, 10]
    assert len(set(keep.tolist())) == 13 and keep.tolist() == sorted(keep.tolist())
    assert np.array_equal(keep, dflt.pick_counts(labels, [3, 0, 10], np.random.default_rng(0)))
    assert not np.array_equal(dflt.pick_counts(labels, [8, 0, 0], np.random.default_rng(0)),
                              dflt.pick_counts(labels, [8, 0, 0], np.random.default_rng(1)))
    with pytest.raises(SystemExit, match="class 1 has 10 images, 11 are needed"):
        dflt.pick_counts(labels, [0, 11, 0], np.random.default_rng(0))


def _idx_set(folder, prefix):
    from vitkit.data.arrays import find_idx, read_idx

    files = find_idx(str(folder))
    return read_idx(files[f"{prefix}-images"]), read_idx(files[f"{prefix}-labels"]).astype(np.int64)


def test_defaults_longtail_and_screening_sets_from_idx_files(dflt, tmp_path):
    from vitkit.data import build_dataset

    src = tmp_path / "fashion-src"
    src.mkdir()
    rng = np.random.default_rng(3)
    source = {}
    for prefix, per_class in (("train", 40), ("t10k", 30)):
        x, y = rng.integers(0, 256, (10 * per_class, 6, 6), dtype=np.uint8), np.arange(10 * per_class) % 10
        dflt.write_idx(src / f"{prefix}-images-idx3-ubyte.gz", x)
        dflt.write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", y)
        source[prefix] = (x, y)
    dest = dflt.longtail_idx(src, tmp_path / "fashion-lt", total=100, ratio=10.0, test_first=20, seed=0)
    for prefix, counts in (("train", [25, 19, 15, 11, 9, 7, 5, 4, 3, 2]), ("t10k", [20, 15, 12, 9, 7, 6, 4, 3, 3, 2])):
        x, y = _idx_set(dest, prefix)
        assert np.bincount(y, minlength=10).tolist() == counts  # 81 test images: 19.82 x the weights, rounded
        pool = {c: {img.tobytes() for img in source[prefix][0][source[prefix][1] == c]} for c in range(10)}
        assert all(img.tobytes() in pool[c] for img, c in zip(x, y))  # each one of its class's own images
        assert len({img.tobytes() for img in x}) == len(x)  # drawn without replacement
    # vitkit reads it as Fashion-MNIST (the folder's name), its t10k files as the val split
    train_ds, val_ds = build_dataset(str(dest), "train"), build_dataset(str(dest), "val")
    assert (len(train_ds), len(val_ds)) == (100, 81) and train_ds.classes[0] == "T-shirt/top"
    # built once: a second call leaves the files alone
    mtime = (dest / "train-images-idx3-ubyte.gz").stat().st_mtime_ns
    assert dflt.longtail_idx(src, dest, total=100, test_first=20) == dest
    assert (dest / "train-images-idx3-ubyte.gz").stat().st_mtime_ns == mtime
    # the screening set: the row's training images only, a fifth of each class held out (at least one)
    screen = dflt.holdout_idx(dest, tmp_path / "fashion-lt-screen", fraction=0.2)
    (tx, ty), (hx, hy), (rx, _) = _idx_set(screen, "train"), _idx_set(screen, "t10k"), _idx_set(dest, "train")
    assert np.bincount(hy, minlength=10).tolist() == [5, 4, 3, 2, 2, 1, 1, 1, 1, 1]
    assert np.bincount(ty, minlength=10).tolist() == [20, 15, 12, 9, 7, 6, 4, 3, 2, 1]
    held, kept = {i.tobytes() for i in hx}, {i.tobytes() for i in tx}
    assert not held & kept and held | kept == {i.tobytes() for i in rx} and len(tx) + len(hx) == 100


def _jpeg(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_defaults_pair_subset_and_its_screening_tar(dflt, tmp_path):
    from vitkit.data import build_dataset

    rng = np.random.default_rng(0)
    files = {f"cifar10/{split}/{c}/{k:04d}.jpg": _jpeg(rng) for split, n in (("train", 6), ("test", 3))
             for c in ("cat", "dog", "frog") for k in range(n)}
    src = tmp_path / "cifar.tar.gz"
    with tarfile.open(src, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    pair = dflt.pair_subset(src, tmp_path / "pair.tar", classes=("cat", "dog"), per_class=4, seed=0)
    with tarfile.open(pair) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
    by_split = {s: sorted(n.split("/")[1] for n in members if n.startswith(s + "/")) for s in ("train", "test")}
    assert by_split == {"train": ["cat"] * 4 + ["dog"] * 4, "test": ["cat"] * 3 + ["dog"] * 3}
    assert all(data == files[f"cifar10/{name}"] for name, data in members.items())  # the source bytes
    train_ds, val_ds = build_dataset(str(pair), "train"), build_dataset(str(pair), "val")
    assert train_ds.classes == ["cat", "dog"] and (len(train_ds), len(val_ds)) == (8, 6)
    screen = dflt.holdout_tar(pair, tmp_path / "pair-screen.tar", fraction=0.25)
    with tarfile.open(screen) as tf:
        names = [m.name for m in tf if m.isfile()]
    held = sorted(n for n in names if n.startswith("val/"))
    assert [n.split("/")[1] for n in held] == ["cat", "dog"] and len(names) == 8
    assert sorted(n.split("/", 1)[1] for n in names) == sorted(n.split("/", 1)[1] for n in members
                                                               if n.startswith("train/"))
    assert len(build_dataset(str(screen), "val")) == 2


def test_defaults_score_from_per_class_counts(dflt):
    s = {"val_acc": 0.76, "val_balanced_acc": 0.55, "val_per_class_count": [80, 20, 0],
         "val_per_class_correct": [72, 4, 0]}
    acc, se = dflt.score_se(s, "acc")
    assert acc == pytest.approx(76 / 100) and se == pytest.approx((0.76 * 0.24 / 100) ** 0.5)
    bal, se = dflt.score_se(s, "balanced_acc")  # (0.9 + 0.2) / 2; the empty class is left out
    assert bal == pytest.approx(0.55) and se == pytest.approx((0.9 * 0.1 / 80 + 0.2 * 0.8 / 20) ** 0.5 / 2)
    assert dflt.score_se({"val_acc": 0.8, "val_balanced_acc": 0.6}, "balanced_acc") == (0.6, None)


def test_defaults_search_picks_the_best_screen_first_on_ties(dflt):
    search = [{"config": "a", "score": 0.5}, {"config": "b", "score": 0.7}, {"config": "c", "score": 0.7},
              {"config": "d", "score": None, "error": "diverged"}]
    assert dflt.choose(search) == "b"
    assert dflt.choose([*search[3:], {"config": "e", "score": 0.1}]) == "e"
    with pytest.raises(SystemExit, match="diverged"):
        dflt.choose(search[3:])


def _stage_record(summary: dict, plan: dict | None = None, wall: float = 100.0) -> dict:
    return {"wall_s": wall, "summary": summary, "run_info": {"plan": plan} if plan else {}, "command": "vitkit train"}


def test_defaults_row_format_and_merge(dflt):
    plan = {"engine.time_budget": {"value": "12m", "reason": "CPU run"}}
    default = _stage_record({"val_acc": 0.9, "val_per_class_count": [90, 10], "val_per_class_correct": [90, 5],
                             "model": "vit_a", "epochs": 60.0}, plan, wall=700.0)
    handset = _stage_record({"val_acc": 0.8, "val_per_class_count": [90, 10], "val_per_class_correct": [72, 8],
                             "model": "vit_b", "epochs": 50.0})
    resnet = _stage_record({"val_acc": 0.85, "val_per_class_count": [90, 10], "val_per_class_correct": [81, 4],
                            "model": "resnet18", "epochs": 40.0})
    assert dflt.planned_budget_s(default) == 720.0 and dflt.planned_budget_s(handset) == 100.0
    search = [{"config": "x", "score": 0.6}, {"config": "y", "score": 0.65}]
    row = dflt.make_row(dflt.ROWS["fashion-lt"], default, handset, resnet, 720.0, search, 180.0)
    assert set(dflt.ROW_KEYS) <= set(row) and row["dataset"] == "fashion-lt"
    # balanced accuracy: (1 + 0.5) / 2, (0.8 + 0.8) / 2, (0.9 + 0.4) / 2
    assert (row["acc_default"], row["acc_handset"], row["acc_resnet18"]) == pytest.approx((0.75, 0.8, 0.65))
    assert row["ratio"] == pytest.approx(0.75 / 0.8) and row["budget_s"] == 720.0 and row["wall_s"] == 700.0
    assert row["search"]["chosen"] == "y" and row["search"]["screen_budget_s"] == 180.0
    assert row["search"]["configs"] == search and row["model"]["resnet18"] == "resnet18"
    top1 = dflt.make_row(dflt.ROWS["cifar10"], default, handset, resnet, 720.0, search, 180.0)
    assert (top1["acc_default"], top1["acc_handset"]) == pytest.approx((0.95, 0.8))
    old = [{"dataset": "cifar10", "acc_default": 0.7, "acc_handset": 0.72, "ratio": 0.97},  # the earlier format
           {**row, "dataset": "shapes"}, {**row, "acc_default": 0.1}]
    merged = dflt.merge_rows(old, [top1, row])
    assert [r["dataset"] for r in merged] == ["shapes", "cifar10", "fashion-lt"]
    assert merged[1] is top1 and merged[2] is row


def test_defaults_row_screens_then_reruns_the_best_at_the_full_budget(dflt, tmp_path, monkeypatch):
    screens = {"light-lr0.003": 0.6, "light-lr0.01": 0.7, "strong-lr0.003": 0.65, "strong-lr0.01": None}
    calls = []

    def fake_stage(root, name, data, args, reuse):  # what each stage is asked to run, no training
        calls.append((name.split("/", 1)[1], data, args))
        if name.endswith("/default"):
            return _stage_record({"val_acc": 0.9}, {"engine.time_budget": {"value": "10m", "reason": ""}}, 590.0)
        score = screens.get(name.split("/screen-")[-1], 0.8)
        if score is None:
            raise SystemExit("training failed: loss is nan")
        return {**_stage_record({"val_acc": score, "epochs": 3.0}), "run_dir": str(root / name)}

    monkeypatch.setattr(dflt, "stage", fake_stage)
    row = dflt.run_row(dflt.ROWS["shapes"], tmp_path, reuse=True, smoke=False)
    assert [c[0] for c in calls] == ["default", *[f"screen-{k}" for k in screens], "handset", "resnet18"]
    assert calls[0][1:] == ("shapes", [])  # the no-flag run: nothing but --data and --out
    for name, data, args in calls[1:5]:  # screened for 3 min on other images (seed 1), at the row's size
        assert data == "shapes" and args[:2] == ["--recipe", str(tmp_path / "recipes" / f"{name[7:]}.yaml")]
        assert {"data.img_size=64", "engine.time_budget=180s", "engine.seed=1"} <= set(args)
    for (_, data, args), recipe_name in zip(calls[5:], ("light-lr0.01", "resnet18")):  # the full 10 min
        assert data == "shapes" and args[1] == str(tmp_path / "recipes" / f"{recipe_name}.yaml")
        assert "engine.time_budget=600s" in args and "engine.seed=1" not in args
    search = row["search"]
    assert search["chosen"] == "light-lr0.01" and search["screen_budget_s"] == 180.0
    failed = search["configs"][3]
    assert failed["score"] is None and "loss is nan" in failed["error"]
    assert row["acc_handset"] == 0.8 and row["ratio"] == pytest.approx(0.9 / 0.8) and row["budget_s"] == 600.0


def test_defaults_recipes_are_plan_free_vitkit_configs(dflt, tmp_path):
    from vitkit.config import load_config, uses_plan

    assert len(dflt.SEARCH) >= 4
    cfgs = {}
    for name, parts in [*dflt.SEARCH.items(), ("resnet18", dflt.RESNET18)]:
        path = dflt.recipe_file(tmp_path, name, parts)
        cfgs[name] = load_config(str(path), [f"data.path={tmp_path}", "data.img_size=32", "engine.time_budget=60s"])
        assert not uses_plan(cfgs[name]) and cfgs[name].engine.epochs >= 10**6
    light, strong = cfgs["light-lr0.003"], cfgs["strong-lr0.01"]
    assert (light.optim.lr, strong.optim.lr) == (0.003, 0.01)
    assert light.data.auto_augment is None and light.data.mixup == 0 and light.data.scale_min == 0.5
    assert strong.data.auto_augment == "rand-m9-mstd0.5-inc1" and (strong.data.mixup, strong.data.cutmix) == (0.8, 1.0)
    assert strong.model.name == "vit_nano_convstem_patch8_64" and dict(strong.model.args) == {"stem_width": 192}
    assert len({str(dflt.recipe(p)) for p in dflt.SEARCH.values()}) == len(dflt.SEARCH)
    r = cfgs["resnet18"]
    assert (r.model.name, dict(r.model.args), r.optim.name, r.schedule.name) == ("resnet18", {}, "sgd", "cosine")
    assert r.optim.lr * 256 / 512 == pytest.approx(0.1) and r.optim.momentum == 0.9  # 0.1 per 256 images


def test_plan_sweep_ladder_adds_one_component_per_level(sweep, tmp_path):
    from vitkit.config import load_config

    def cfg(level):
        return load_config(None, [f"data.path={tmp_path}", *sweep.FASTER, *sweep.LADDER[level]])

    assert sweep.LEVELS == ("light", "+smoothing", "+randaugment", "+erasing", "+mix")
    got = [(c.data.label_smoothing, c.data.auto_augment, c.data.re_prob, c.data.mixup, c.data.cutmix,
            c.model.drop_path_rate) for c in map(cfg, sweep.LEVELS)]
    assert got == [(0.0, None, 0.0, 0.0, 0.0, 0.0), (0.1, None, 0.0, 0.0, 0.0, 0.0),
                   (0.1, "rand-m9-mstd0.5-inc1", 0.0, 0.0, 0.0, 0.0), (0.1, "rand-m9-mstd0.5-inc1", 0.25, 0.0, 0.0, 0.0),
                   (0.1, "rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.1)]
    assert all(cfg(level).data.scale_min == 0.5 and cfg(level).engine.ema_decay is None for level in sweep.LEVELS)


def test_plan_sweep_models_are_the_plans_small_image_candidates(sweep, tmp_path):
    from vitkit.config import load_config
    from vitkit.data.inspect import DatasetInfo
    from vitkit.plan import candidates

    planned = candidates(DatasetInfo(10, 3, (32, 32), 1000, 100, "folder"), None)
    ours = []
    for args in (sweep.LARGER, sweep.FASTER):
        c = load_config(None, [f"data.path={tmp_path}", *args])
        ours.append((c.model.name, c.data.img_size, dict(c.model.args)))
    assert ours == [(c.name, c.img_size, dict(c.args)) for c in planned]


def _cell(row, score, se=0.01, **kw):
    return {"row": row, "score": score, "se": se, **kw}


def test_plan_sweep_derivations_on_a_fake_sweep(sweep):
    lv = sweep.LEVELS
    ladder = []
    # row r: light best at 15 passes, +smoothing clearly ahead at 30 (0.05 > tol 0.0141)
    for e, scores in ((15, (0.80, 0.79, 0.78, 0.77, 0.70)), (30, (0.80, 0.85, 0.86, 0.86, 0.90))):
        ladder += [_cell("r", s, epochs_set=e, level=level) for level, s in zip(lv, scores)]
    # row s: light within tol of the best at both (0.80 vs 0.81); +mix gains at 30 only
    for e, scores in ((15, (0.80, 0.80, 0.80, 0.79, 0.78)), (30, (0.80, 0.80, 0.80, 0.79, 0.81))):
        ladder += [_cell("s", s, epochs_set=e, level=level) for level, s in zip(lv, scores)]
    ladder.append(_cell("s", None, epochs_set=60, level="light"))  # a failed cell counts for nothing
    light = sweep.derive_light_epochs(ladder)
    assert light["per_row"] == {"r": 15, "s": 30} and light["estimate"] == 15
    steps = sweep.derive_steps(ladder)
    assert steps["+smoothing"]["per_row"] == {"r": 30, "s": None} and steps["+smoothing"]["epochs"] is None
    assert steps["+mix"]["per_row"] == {"r": 30, "s": 30} and steps["+mix"]["epochs"] == 30
    assert steps["+mix"]["strength"] == pytest.approx(sweep.aug_strength(30), abs=1e-3)
    assert steps["+mix"]["gain"]["r"]["15"] == pytest.approx(-0.07)
    models = [_cell("r", 0.70, model="faster", budget_s=60.0, epochs=30.0),
              _cell("r", 0.60, model="larger", budget_s=60.0, epochs=10.0),
              _cell("r", 0.74, model="faster", budget_s=180.0, epochs=90.0),
              _cell("r", 0.75, model="larger", budget_s=180.0, epochs=30.0),
              _cell("s", 0.70, model="faster", budget_s=60.0, epochs=60.0),
              _cell("s", 0.70, model="larger", budget_s=60.0, epochs=20.0)]
    mins = sweep.derive_min_epochs(models)
    assert mins["per_row"] == {"r": 30.0, "s": 20.0} and mins["estimate"] == 30.0
    assert sweep.derive_min_epochs(models[:2])["estimate"] is None  # the larger one never caught up
