"""Dense runs through the one Trainer: every head trains and resumes bitwise, the final weights
rebuild the dense model, and the dense plan's rules on made-up scans and timings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_same_run, crash_and_resume, require_peer
from PIL import Image

from vitkit.config import load_config
from vitkit.errors import ConfigError
from vitkit.plan_dense import (
    BACKBONE,
    DenseCalibration,
    DenseInfo,
    HeadTiming,
    crop_for,
    dense_budget_s,
    head_width_args,
    make_dense_plan,
)
from vitkit.plan_eval import CAP_FACTOR, CAP_MIN_EPOCHS

SEG_KEYS = {"class_weights": None, "dice_weight": 0.0, "window": None}


# ---- the plan: pure rules on made-up scans ----------------------------------------------------------


def seg_info(n=367, size=(180, 240), classes=11, pixels=None, ignore=11):
    pixels = pixels or [1000] * classes
    return DenseInfo(task="segment", typical_size=size, n_train=n, n_val=n // 4, in_chans=3, num_classes=classes,
                     classes=tuple(f"c{i}" for i in range(classes)), ignore_index=ignore, format="camvid",
                     class_pixels=tuple(pixels))


def calib(heads, crop=176, stride=8, device="cpu", decode=0.0):
    c = DenseCalibration(device, {}, decode, stride=stride, crop=crop)
    for name, (rate, out_stride) in heads.items():
        c.heads[name] = HeadTiming(rate, 2 * rate, out_stride, 1_000_000)
        c.img_per_s[name], c.eval_img_per_s[name] = rate, 2 * rate
    return c


def test_dense_budget_and_crop_rules():
    assert dense_budget_s(367) == 1200 and dense_budget_s(1000) == 1200
    assert dense_budget_s(1500) == 1800 and dense_budget_s(10**6) == 3600
    # The shorter side in multiples of the stride, capped, at least four strides.
    assert crop_for((180, 240), 8) == 176 and crop_for((180, 240), 32) == 160
    assert crop_for((1024, 2048), 16) == 256 and crop_for((1024, 2048), 16, "cuda") == 512
    assert crop_for((20, 30), 16) == 32 and crop_for((48, 64), 16) == 48
    # Decoders as wide as the backbone allows, in powers of two; heads without a width keep theirs.
    assert head_width_args("upernet", 192) == {"channels": 128} and head_width_args("dpt", 768) == {"features": 512}
    assert head_width_args("upernet", 16) == {"channels": 32} and head_width_args("linear", 192) == {}


def test_plan_takes_the_finest_head_that_gets_enough_epochs():
    # 367 images in 20 min: upernet at 20 img/s gets 20 * 0.9 * 1200 / 367 = 59 epochs (>= 40), linear more.
    p = make_dense_plan(seg_info(), calib({"upernet": (20.0, 4), "linear": (60.0, 8)}), {}, SEG_KEYS)
    v = p.values
    assert v["engine.time_budget"] == "20m" and v["model.name"] == BACKBONE
    assert v["model.head"] == "upernet" and "finest output" in p.reasons["model.head"]
    assert v["data.img_size"] == 176 and v["data.batch_size"] == 8
    assert v["engine.epochs"] == max(CAP_MIN_EPOCHS, math.ceil(CAP_FACTOR * 20 * 0.9 * 1200 / 367))
    assert "model.head_args" not in v  # none measured with the timing
    c = calib({"upernet": (20.0, 4)})
    c.heads["upernet"].extra["head_args"] = {"channels": 128}
    assert make_dense_plan(seg_info(), c, {}, SEG_KEYS).values["model.head_args"] == {"channels": 128}
    assert "model.head_args" not in make_dense_plan(seg_info(), c, {"model.head_args": {}}, SEG_KEYS).values
    # A head predicting above the input resolution gains nothing over stride 1: the faster one wins.
    p1 = make_dense_plan(seg_info(), calib({"setr_pup": (20.0, 0.5), "upernet": (30.0, 1)}), {}, SEG_KEYS)
    assert p1.values["model.head"] == "upernet"
    # Slower upernet (8 img/s: 23 epochs) loses to linear, which still gets 70.
    p2 = make_dense_plan(seg_info(), calib({"upernet": (8.0, 4), "linear": (24.0, 8)}), {}, SEG_KEYS)
    assert p2.values["model.head"] == "linear"
    # No head gets 40 epochs: the fastest.
    p3 = make_dense_plan(seg_info(), calib({"upernet": (2.0, 4), "linear": (5.0, 8)}), {}, SEG_KEYS)
    assert p3.values["model.head"] == "linear" and "fastest" in p3.reasons["model.head"]


def test_plan_weighs_imbalanced_classes_and_names_them():
    pixels = [50_000, 30_000, 10_000, 200, 0]  # 250:1 among the present ones, one class absent
    p = make_dense_plan(seg_info(classes=5, pixels=pixels, ignore=5), calib({"upernet": (20.0, 4)}), {}, SEG_KEYS)
    assert p.values["objective.class_weights"] == "inverse_sqrt"
    notes = " ".join(p.notes)
    assert "ignore index 5" in notes and "c3" in notes and "absent" in notes
    balanced = make_dense_plan(seg_info(classes=3, pixels=[10, 12, 11], ignore=255), calib({"upernet": (20.0, 4)}),
                               {}, SEG_KEYS)
    assert balanced.values["objective.class_weights"] == "none"
    # An objective without the key gets nothing planned for it.
    assert "objective.class_weights" not in make_dense_plan(seg_info(), calib({"upernet": (20.0, 4)}), {}, {}).values


def test_plan_generalises_to_large_images_and_many_of_them():
    info = seg_info(n=3000, size=(1024, 2048), classes=19, ignore=255)
    p = make_dense_plan(info, calib({"upernet": (6.0, 4), "linear": (15.0, 8)}, crop=256), {}, SEG_KEYS)
    v = p.values
    assert v["engine.time_budget"] == "60m"  # proportional to the images, capped at an hour
    assert v["data.img_size"] == 256 and v["objective.window"] == 256  # > 2x the crop: sliding windows
    assert v["data.batch_size"] == 8


def test_plan_on_a_gpu_is_sized_in_epochs_and_keeps_user_keys():
    p = make_dense_plan(seg_info(), calib({"upernet": (200.0, 4)}, device="cuda"), {})
    assert "engine.time_budget" not in p.values and p.values["engine.epochs"] >= 50
    user = {"model.head": "linear", "data.batch_size": 4, "engine.time_budget": "5m"}
    p2 = make_dense_plan(seg_info(), calib({"linear": (30.0, 8)}), user, SEG_KEYS)
    assert not set(user) & set(p2.values)
    assert p2.values["data.img_size"] == 176


def test_depth_plan_has_no_class_keys_and_no_colour_jitter():
    info = DenseInfo(task="depth", typical_size=(128, 128), n_train=200, n_val=20, in_chans=3, num_classes=0)
    p = make_dense_plan(info, calib({"dpt": (30.0, 4), "linear": (60.0, 8)}, crop=128), {}, {"loss": "ssi"})
    assert p.values["model.head"] == "dpt" and p.values["data.color_jitter"] == 0.0
    assert not any(k.startswith("objective.class") for k in p.values)


# ---- runs through the Trainer (tiny: the built-in scenes at 32 px crops, a few steps) ----------------

ENGINE = ["engine.amp=none", "engine.tensorboard=false", "engine.plots=false", "data.num_workers=0",
          "engine.log_every=2"]


# Narrow heads keep each run to seconds (the defaults are the papers' 256-512 channels).
SMALL_HEADS = {"upernet": {"channels": 16}, "setr_pup": {"channels": 16}, "setr_naive": {"channels": 16},
               "setr_mla": {"neck_channels": 16, "mla_channels": 8}, "dpt": {"features": 16},
               "segmenter": {"n_layers": 1}, "vit_adapter": {"conv_inplane": 8, "decoder_channels": 16}}
# Backbone settings a head needs (ViT-Adapter interacts with four groups of blocks).
HEAD_BACKBONES = {"vit_adapter": {"depth": 4}}


def _dense_cfg(out, head, *extra, data="scenes:48", task=None):
    overrides = [f"data.path={data}", "model.name=test_vit", f"model.head={head}", "data.img_size=32",
                 "data.batch_size=8", "data.eval_batch_size=16", f"engine.out_dir={out}", *ENGINE, *extra]
    overrides += [f"model.head_args.{k}={v}" for k, v in SMALL_HEADS.get(head, {}).items()]
    overrides += [f"model.args.{k}={v}" for k, v in HEAD_BACKBONES.get(head, {}).items()]
    if task:
        overrides.append(f"data.task={task}")
    return load_config(overrides=overrides, plan=False)


def _segment_heads():
    from vitkit.dense import list_heads

    return list_heads("segment")


@pytest.mark.parametrize("head", _segment_heads())
def test_every_head_trains_and_resumes_bitwise(tmp_path, head):
    from vitkit.train import build_run

    def trainer(out, hooks=()):
        cfg = _dense_cfg(out, head, "engine.max_steps=5", "engine.ckpt_every_steps=2", "engine.epochs=5")
        torch.manual_seed(cfg.engine.seed)
        tr, info = build_run(cfg, verbose=False)
        assert info["task"] == "segment" and info["head"] == head
        tr.hooks = list(hooks)
        return tr

    full = trainer(tmp_path / "full")
    summary = full.fit()
    assert full.step == 5 and math.isfinite(summary["val_loss"] if summary.get("val_loss") is not None else 0.0)
    assert 0.0 <= summary["val_miou"] <= 1.0
    resumed = crash_and_resume(trainer, tmp_path / "run", 3, latest=2)
    assert_same_run(full, resumed, optimizer=False)


def test_dense_run_writes_self_describing_weights_that_load_back(tmp_path):
    from vitkit import load_model
    from vitkit.dense import DenseModel
    from vitkit.train import train

    cfg = _dense_cfg(tmp_path / "run", "linear", "engine.max_steps=2", "engine.epochs=1")
    summary = train(cfg, verbose=False)
    assert summary["task"] == "segment" and summary["steps"] == 2
    import json

    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["task"] == "segment" and info["head"] == "linear" and info["backbone"] == "test_vit"
    assert info["classes"] and info["ignore_index"] is not None and info["model_args"]["head"] == "linear"
    by_run, by_file = load_model(tmp_path / "run"), load_model(tmp_path / "run" / "model.safetensors")
    for lm in (by_run, by_file):
        assert isinstance(lm.model, DenseModel) and lm.task == "segment" and lm.is_dense
        assert list(lm.labels) == info["classes"]
    # Any input size: the model pads to its stride and crops back (50 x 70 is no multiple of 8).
    x = torch.randint(0, 256, (1, 3, 50, 70), dtype=torch.uint8)
    a, b = by_run.dense(x), by_file.dense(x)
    assert a.shape == (1, len(info["classes"]), 50, 70)
    assert torch.equal(a, b)
    # A checkpoint's plain weights rebuild through its run's run.json.
    from vitkit.rundir import RunDir

    by_ckpt = load_model(RunDir(tmp_path / "run").checkpoint("latest"))
    assert by_ckpt.task == "segment" and torch.equal(by_ckpt.dense(x), a)

    # The demo of a segmentation run shows the overlay and each class's share of the pixels.
    from vitkit.dense.plots import class_colours
    from vitkit.interpret.demo import build_demo, dense_view

    image = Image.fromarray(x[0].permute(1, 2, 0).numpy())
    shares, picture = dense_view(by_run, image)
    pred = a[0].argmax(0)
    assert picture.shape == (50, 70, 3) and abs(sum(shares.values()) - 1) < 1e-6
    top = max(shares, key=shares.get)
    assert shares[top] == pytest.approx(float((pred == info["classes"].index(top)).float().mean()))
    # Each pixel is the half-way blend of the image and its predicted class's colour.
    blend = 0.5 * np.asarray(image, dtype=np.float64) + 0.5 * class_colours(len(info["classes"]))[pred.numpy()]
    assert np.abs(picture - blend).max() <= 0.5 + 1e-9
    require_peer("gradio")
    assert build_demo(by_run) is not None


def test_classification_objective_or_head_on_the_wrong_data_is_a_config_error(tmp_path):
    from vitkit.train import build_run

    cfg = _dense_cfg(tmp_path / "a", "linear", "objective.name=supervised")
    with pytest.raises(ConfigError, match="objective.name=supervised is a classification objective"):
        build_run(cfg, verbose=False)
    cfg = load_config(overrides=["data.path=shapes:32", "model.name=test_vit", "model.head=linear",
                                 f"engine.out_dir={tmp_path / 'b'}", *ENGINE], plan=False)
    with pytest.raises(ConfigError, match="model.head=linear is for segmentation and depth"):
        build_run(cfg, verbose=False)


def test_config_checks_the_task_and_takes_dense_objective_keys_without_a_name():
    with pytest.raises(ConfigError, match="data.task must be one of"):
        load_config(overrides=["data.path=scenes:8", "data.task=segmentation"])
    cfg = load_config(overrides=["data.path=scenes:8", "objective.dice_weight=0.5"], plan=False)
    assert cfg.objective["dice_weight"] == 0.5
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(overrides=["data.path=shapes:8", "objective.name=supervised", "objective.dice_weight=0.5"])


def test_depth_run_trains_and_predicts_depth_files(tmp_path):
    from vitkit import load_model
    from vitkit.predict import predict
    from vitkit.train import train

    head = "dpt" if "dpt" in _depth_heads() else _depth_heads()[0]
    cfg = _dense_cfg(tmp_path / "run", head, "engine.max_steps=2", "engine.epochs=1", "objective.loss=silog",
                     data="depth-scenes:24", task="depth")
    summary = train(cfg, verbose=False)
    assert summary["task"] == "depth" and summary["val_delta1"] is not None
    lm = load_model(tmp_path / "run")
    assert lm.task == "depth"
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    img.save(tmp_path / "view.png")
    (r,) = predict(lm, [tmp_path / "view.png"], out_dir=tmp_path / "pred")
    # A metric model (the scale-invariant log loss): depth in millimetres, non-negative.
    assert r["space"] == "depth" and r["depth"].endswith("view_depth.png")
    depth = Image.open(r["depth"])
    assert depth.size == (56, 40) and np.asarray(depth).dtype == np.uint16
    assert Image.open(r["depth_color"]).mode == "RGB" and r["depth_min"] >= 0


def _depth_heads():
    from vitkit.dense import list_heads

    return list_heads("depth")
