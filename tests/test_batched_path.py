"""The batched path (``data.augment_on=device``) through ``vitkit.train``: a tiny run end to end from
the decode-once store, bitwise resume on CPU, the too-large fallback, and the rule that chooses the
path (vitkit.plan_data) on synthetic scans with sizes computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import assert_same_run, crash_and_resume, write_class_folder
from PIL import Image

from vitkit.config import load_config
from vitkit.data import DatasetInfo, ImageLoader
from vitkit.data.loader import StoreLoader
from vitkit.errors import ConfigError
from vitkit.plan import Plan
from vitkit.plan_data import PIPELINE, choose_data_path, plan_data_path, resolve_data_path
from vitkit.train import build_run, train

BASE = ["model.name=test_vit", "data.img_size=32", "data.batch_size=16", "data.num_workers=0", "engine.amp=none",
        "engine.tensorboard=false", "engine.plots=false", "data.augment_on=device"]
DEIT = ["data.auto_augment=rand-m9-mstd0.5-inc1", "data.re_prob=0.5", "data.mixup=0.8", "data.cutmix=1.0",
        "data.label_smoothing=0.1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes of 24 x 24 PNGs and one 30 x 20 image each: 75 files, 2 per class held out (10%), so 69
    train in 4 batches of 16; the typical size is 24 x 24, the store's size too."""
    root = tmp_path_factory.mktemp("batched") / "ds"
    write_class_folder(root, per_class=24)
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(root / name / "odd.png")
    return str(root)


def _config(folder: str, out, *extra: str):
    return load_config(overrides=[*BASE, f"data.path={folder}", f"engine.out_dir={out}", *extra], plan=False)


def test_train_on_the_batched_path_end_to_end(folder, tmp_path, capsys):
    tr, info = build_run(_config(folder, tmp_path / "run", *DEIT, "data.store=memory", "engine.epochs=1"))
    assert "decoded 69 training images at 24x24 once into memory" in capsys.readouterr().out
    assert isinstance(tr.train_loader, StoreLoader) and info["data_path"] == {"store": "memory", "augment_on": "device"}
    assert {tuple(hw) for hw in tr.train_loader.store.orig_hw.tolist()} <= {(24, 24), (30, 20)}
    batch = next(iter(tr.train_loader))
    assert batch["image"].shape == (16, 3, 24, 24) and batch["image"].dtype == torch.uint8
    seen = tr.train_transform(batch)
    assert seen["image"].shape == (16, 3, 32, 32) and seen["image"].dtype == torch.float32
    assert "orig_hw" not in seen and seen["target"].shape == (16, 3)  # cropped and resized to 32 px, then mixed

    summary = train(_config(folder, tmp_path / "run2", *DEIT, "data.store=memory", "engine.epochs=1"), verbose=False)
    assert summary["steps"] == 4 and math.isfinite(summary["val_loss"])
    assert json.loads((tmp_path / "run2" / "run.json").read_text())["data_path"]["augment_on"] == "device"


@pytest.mark.parametrize("store", ["mmap", "off"])
def test_batched_path_resumes_bitwise_on_cpu(folder, tmp_path, store):
    """Crops, flips, RandAugment, erasing and Mixup/CutMix batched in the main process (from the store's
    file, read back by the resumed run; or decoded each epoch): a run interrupted mid-epoch and resumed
    ends with exactly the weights of an uninterrupted run."""

    def trainer(out, hooks=()):
        cfg = _config(folder, out, *DEIT, f"data.store={store}", "engine.epochs=2", "engine.ckpt_every_steps=3")
        torch.manual_seed(cfg.engine.seed)
        tr, _ = build_run(cfg, verbose=False)
        tr.hooks = list(hooks)
        return tr

    full = trainer(tmp_path / "full")
    assert isinstance(full.train_loader, StoreLoader if store == "mmap" else ImageLoader)
    full.fit()
    # 4 steps per epoch: the checkpoint at step 6 is mid-epoch 2.
    resumed = crash_and_resume(trainer, tmp_path / "run", 7, latest=6)
    assert full.step == 8
    assert_same_run(full, resumed, optimizer=False)


def test_too_large_store_falls_back_to_decoding_with_a_message(folder, tmp_path, capsys):
    tr, info = build_run(_config(folder, tmp_path / "run", "data.store=memory", "data.store_max_gb=1e-6",
                                 "engine.epochs=1"))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("data.store=")]
    # 69 x (3 x 24 x 24 + 24) bytes = 0.12 MB, against 1e-6 GB = 1,000 bytes.
    assert lines == ["data.store=memory: 69 training images at 24x24 need 0.1 MB decoded, more than 0.0 MB "
                     "(data.store_max_gb=1e-06): decoding them every epoch instead"]
    assert isinstance(tr.train_loader, ImageLoader) and info["data_path"] == {"store": "off", "augment_on": "device"}
    batch = next(iter(tr.train_loader))  # the workers decode and bring each image to the store's size
    assert batch["image"].shape == (16, 3, 24, 24) and batch["orig_hw"].shape == (16, 2)


# ---- the rule ---------------------------------------------------------------------------------------


def test_choose_data_path_from_memory_and_device():
    # 50,000 CIFAR images: 50,000 x (3 x 32 x 32 + 24) = 154,800,000 bytes.
    small = choose_data_path(50_000, (32, 32), 32, 3, "cuda", max_gb=1.0, auto_augment="rand-m9-mstd0.5-inc1")
    assert (small.store, small.augment_on, small.max_bytes) == ("memory", "device", 10**9)
    assert "need 154.8 MB of the 1.0 GB allowed (data.store_max_gb=1)" in small.store_reason
    assert "RandAugment (rand-m9-mstd0.5-inc1) batched on the device" in small.augment_reason
    assert choose_data_path(50_000, (32, 32), 32, 3, "cuda", max_gb=1.0, processes=4).store == "mmap"
    cpu = choose_data_path(50_000, (32, 32), 32, 3, "cpu", max_gb=1.0)  # fits a store: batched in the main process
    assert (cpu.store, cpu.augment_on) == ("memory", "device") and "1.13x the worker path" in cpu.augment_reason
    tight = choose_data_path(50_000, (32, 32), 32, 3, "cpu", max_gb=0.1)  # 154.8 MB do not fit: the workers
    assert (tight.store, tight.augment_on) == ("off", "workers") and "do not fit a store" in tight.augment_reason
    assert "more than 100.0 MB (data.store_max_gb=0.1)" in tight.store_reason
    arrays = choose_data_path(60_000, (28, 28), 32, 1, "cpu", max_gb=1.0, arrays=True)  # IDX: nothing to decode
    assert (arrays.store, arrays.augment_on, arrays.max_bytes) == ("off", "workers", None)
    assert "decoded arrays already" in arrays.augment_reason and "nothing to decode once" in arrays.store_reason
    assert choose_data_path(60_000, (28, 28), 32, 1, "cuda", max_gb=1.0, arrays=True).store == "memory"  # a GPU
    no_store = choose_data_path(50_000, (32, 32), 32, 3, "cpu", store="off", max_gb=1.0)
    assert (no_store.augment_on, no_store.max_bytes) == ("workers", None) and "data.store=off" in no_store.augment_reason
    on_cpu = choose_data_path(50_000, (32, 32), 32, 3, "cpu", store="memory", max_gb=1.0)
    assert (on_cpu.store, on_cpu.augment_on) == ("memory", "device")  # a store asked for: batched
    # ImageNet-sized photos at 224 px: 1,281,167 x (3 x 375 x 500 + 24) bytes = 720.7 GB.
    big = choose_data_path(1_281_167, (375, 500), 224, 3, "cpu", max_gb=64.0)
    assert (big.store, big.augment_on) == ("off", "workers")
    assert "crops and flips" in big.augment_reason and "need 720.7 GB, more than 64.0 GB" in big.store_reason
    gpu = choose_data_path(1_281_167, (375, 500), 224, 3, "cuda", max_gb=64.0)
    assert (gpu.store, gpu.augment_on) == ("off", "device") and "need 720.7 GB, more than 64.0 GB" in gpu.store_reason
    kept = choose_data_path(10, (32, 32), 32, 3, "cpu", store="off", augment_on="device", max_gb=1.0)
    assert (kept.store, kept.augment_on, kept.store_reason) == ("off", "device", "as configured")
    assert choose_data_path(10, (32, 32), 32, 3, "cuda", augment_on="workers", max_gb=1.0).store == "off"


def _info(fmt: str = "folder") -> DatasetInfo:
    return DatasetInfo(num_classes=10, in_chans=3, typical_size=(32, 32), n_train=50_000, n_val=5_000, format=fmt)


def test_plan_sets_the_data_path_with_reasons():
    plan = Plan()
    plan.set("data.auto_augment", "rand-m6-mstd0.5-inc1", "planned")
    plan_data_path(plan, _info(), "cuda", {"data.store_max_gb": 2.0}, 32, 3)
    assert plan.values["data.store"] == "memory" and plan.values["data.augment_on"] == "device"
    assert "154.8 MB of the 2.0 GB allowed" in plan.reasons["data.store"]
    assert "rand-m6-mstd0.5-inc1" in plan.reasons["data.augment_on"]

    user = Plan()  # the user's keys are never planned; the other follows them
    plan_data_path(user, _info(), "cpu", {"data.augment_on": "workers"}, 32, 3)
    assert "data.augment_on" not in user.values and user.values["data.store"] == "off"
    both = Plan()
    plan_data_path(both, _info(), "cpu", {"data.store": "off", "data.augment_on": "device"}, 32, 3)
    assert both.values == {}

    shards = Plan()
    plan_data_path(shards, _info("webdataset"), "cuda", {}, 32, 3)
    assert shards.values == {"data.store": "off", "data.augment_on": "workers"}
    assert "streaming" in shards.reasons["data.store"]


def test_resolve_keeps_recipes_on_the_worker_path_and_refuses_impossible_choices():
    d = load_config(overrides=["data.path=shapes:48"]).data
    assert (d.store, d.augment_on) == ("auto", "auto")
    path = resolve_data_path(d, _info(), "cpu", 32, 3, why_not=None)
    assert (path.store, path.augment_on) == ("off", "workers")  # a recipe run without the plan: as before

    d.store, d.augment_on = "memory", "workers"
    with pytest.raises(ConfigError, match="data.augment_on=device"):
        resolve_data_path(d, _info(), "cpu", 32, 3, why_not=None)
    d.augment_on = "device"
    with pytest.raises(ConfigError, match="data.store=memory and data.augment_on=device asks for the batched path"):
        resolve_data_path(d, _info(), "cpu", 32, 3, why_not=PIPELINE, user_keys={"data.store", "data.augment_on"})
    planned = resolve_data_path(d, _info(), "cpu", 32, 3, why_not=PIPELINE, user_keys=set())
    assert (planned.store, planned.augment_on, planned.store_reason) == ("off", "workers", PIPELINE)


@pytest.mark.parametrize("override, key", [("data.store=disk", "data.store"), ("data.augment_on=gpu", "data.augment_on"),
                                           ("data.store_max_gb=0", "data.store_max_gb")])
def test_bad_data_path_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=["data.path=shapes:48", override])


def test_store_off_reads_as_off():
    # YAML reads a bare `off` as false; the key still means off.
    assert load_config(overrides=["data.path=shapes:48", "data.store=off"]).data.store == "off"
