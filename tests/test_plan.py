"""The data-aware plan: choices on synthetic scans, overrides kept, and the no-flag path end to end."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image, ImageDraw

from vitkit import plan as plan_mod
from vitkit.config import load_config, user_keys, uses_plan
from vitkit.data.inspect import DatasetInfo, inspect_dataset
from vitkit.plan import Calibration, apply_plan, cpu_budget_s, make_plan
from vitkit.plan_calibrate import Candidate, find_pretrained

SMALL_A, SMALL_B = "vit_nano_convstem_patch4_32@32", "vit_nano_convstem_patch8_64@32"
MED_A, MED_B = "vit_nano_convstem_patch8_64@64", "vit_nano_convstem_patch16_64@64"
DEIT, DEIT_HALF = "deit_tiny_patch16_224@224", "deit_tiny_patch16_224@112"


def info(n=8000, side=28, chans=1, classes=10, counts=None):
    counts = counts or [n // classes] * classes
    return DatasetInfo(num_classes=classes, in_chans=chans, typical_size=(side, side), n_train=n,
                       n_val=n // 9, format="folder", classes=tuple(f"c{i}" for i in range(classes)),
                       class_counts=tuple(counts))


def cpu(rates, decode=0.0, pretrained=None):
    return Calibration("cpu", dict(rates), decode, pretrained)


def test_cpu_budget_rule():
    assert cpu_budget_s(2_000) == 600 and cpu_budget_s(50_000) == 600
    assert cpu_budget_s(60_000) == 720  # 12 min: proportional beyond 50k, whole minutes
    assert cpu_budget_s(10**7) == 3600


def test_small_gray_dataset_many_epochs_gets_capable_model_and_strong_augmentation():
    # 8k images, 450 img/s for the fast model, 150 for the capable one: 150 * 540 / 8000 ~ 10 epochs
    # for the capable one (< 15), so the fast one, with ~30 epochs.
    p = make_plan(info(8000), cpu({SMALL_B: 450.0, SMALL_A: 150.0}), {})
    v = p.values
    assert v["engine.time_budget"] == "10m"
    assert v["model.name"] == "vit_nano_convstem_patch8_64" and v["data.img_size"] == 32
    assert v["model.args"] == {"stem_width": 192}
    assert v["data.batch_size"] == 128
    epochs = 450 * 0.9 * 600 / 8000  # 30.4: a short run, light augmentation
    s = plan_mod.aug_strength(epochs)
    assert 0 < s < 0.01
    assert v["data.auto_augment"] is None and v["data.mixup"] == 0 and v["data.re_prob"] == 0
    assert v["data.label_smoothing"] == 0 and v["model.drop_path_rate"] == 0 and v["data.scale_min"] == 0.5
    assert v["engine.epochs"] == 304  # a cap only: 10x the ~30 expected passes
    # Channels-last for the conv stem; flips in training, so flip averaging at evaluation.
    assert v["engine.channels_last"] is True and v["objective.tta"] == "hflip"
    # 888 validation images can tell a plateau: 4 evaluations in a quarter of ~30 epochs, one per epoch.
    assert v["engine.plateau_patience"] == 0.25 and v["engine.eval_every"] == 1
    # The capable model is chosen only where it still gets MIN_EPOCHS (100) passes: 400 img/s gives it 27,
    # 1,500 img/s 101.
    assert make_plan(info(8000), cpu({SMALL_B: 450.0, SMALL_A: 400.0}), {}).values["model.name"] == \
        "vit_nano_convstem_patch8_64"
    p2 = make_plan(info(8000), cpu({SMALL_B: 1600.0, SMALL_A: 1500.0}), {})
    assert p2.values["model.name"] == "vit_nano_convstem_patch4_32" and "model.args" not in p2.values


def test_tiny_dataset_strong_regularisation_small_batch():
    p = make_plan(info(1800, side=32, chans=3, classes=4), cpu({SMALL_B: 900.0, SMALL_A: 600.0}), {})
    v = p.values
    assert v["model.name"] == "vit_nano_convstem_patch4_32"  # 600 * 540 / 1800 = 180 epochs
    assert v["data.batch_size"] == 32  # 1800 / 30 = 60 -> 32
    s = plan_mod.aug_strength(600 * 0.9 * 600 / 1800)
    assert 0.7 < s < 0.8  # log(180 / 30) / log(300 / 30)
    assert v["data.auto_augment"] == f"rand-m{round(3 + 6 * s)}-mstd0.5-inc1"
    assert v["data.re_prob"] == round(0.25 * s, 2) and v["model.drop_path_rate"] == round(0.1 * s, 2)
    assert v["data.mixup"] > 0 and v["data.cutmix"] > 0 and v["data.label_smoothing"] == 0.1
    assert v["engine.ema_decay"] is not None and 0.99 <= v["engine.ema_decay"] < 1


def test_large_dataset_light_augmentation():
    p = make_plan(info(60_000, side=28), cpu({SMALL_B: 400.0}), {})
    v = p.values
    assert v["engine.time_budget"] == "12m"
    assert v["model.name"] == "vit_nano_convstem_patch8_64"  # 400 * 648 / 60000 = 4.3 epochs
    assert v["data.auto_augment"] is None and v["data.mixup"] == 0 and v["data.re_prob"] == 0
    assert v["data.label_smoothing"] == 0 and v["model.drop_path_rate"] == 0
    # ~4.3 passes from scratch underfit: whole images, flipped; crops return by LIGHT_EPOCHS.
    assert v["data.scale_min"] == 1.0 and "flips only" in p.reasons["data.scale_min"]
    assert v["engine.ema_decay"] is None
    assert [plan_mod.crop_scale_min(e) for e in (4, 10, 17.3, 30, 300)] == [1.0, 1.0, 0.75, 0.5, 0.25]
    assert plan_mod.crop_scale_min(4, finetune=True) == 0.5
    assert v["schedule.name"] == "onecycle" and v["optim.lr"] == 6e-3  # batch 128: the tuned recipe's lr


def test_a_slow_calibration_does_not_cut_the_run_short():
    """Calibrated at 55 img/s (another process held a core) where it trains at ~500: the cap on
    epochs must not end a 12-minute run after 2 passes."""
    v = make_plan(info(60_000, side=28), cpu({SMALL_B: 55.0}), {}).values  # ~0.5 expected passes
    assert v["engine.time_budget"] == "12m" and v["engine.epochs"] == 10
    assert make_plan(info(8000), cpu({SMALL_B: 45.0}), {}).values["engine.epochs"] == 31  # 10x ~3 passes


def test_calibration_takes_the_median_step(monkeypatch):
    """On a clock where every step takes 10 ms and one training step and one evaluation pass are held up
    for a second (another process on the machine), the rates are those of the 10 ms steps; a mean over
    the window would make them ~30x lower."""
    from types import SimpleNamespace

    from vitkit import plan_calibrate

    now = [0.0]
    monkeypatch.setattr(plan_calibrate, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    real = plan_calibrate.create_model

    def on_the_clock(*a, **k):
        model, calls = real(*a, **k), {True: 0, False: 0}
        forward = model.forward

        def fwd(x):
            calls[model.training] += 1
            now[0] += 0.01 + (1.0 if calls[model.training] == 4 else 0.0)  # after 2 (1) untimed: the 2nd (3rd) timed
            return forward(x)
        model.forward = fwd
        return model

    monkeypatch.setattr(plan_calibrate, "create_model", on_the_clock)
    train, evaluate = plan_calibrate.time_model("test_vit", 32, {}, in_chans=1, num_classes=10, batch=8,
                                                device=torch.device("cpu"), amp_dtype=None, min_s=0.3)
    assert train == pytest.approx(8 / 0.01) and evaluate == pytest.approx(16 / 0.01)


def test_decode_cost_lowers_expected_epochs():
    fast = make_plan(info(2000), cpu({SMALL_B: 450.0}), {})  # ~120 epochs
    slow = make_plan(info(2000), cpu({SMALL_B: 450.0}, decode=0.01), {})  # 10 ms/image: ~82 img/s, ~22 epochs
    assert slow.values["data.mixup"] == 0 < fast.values["data.mixup"] or (
        slow.values["model.drop_path_rate"] < fast.values["model.drop_path_rate"])


def test_medium_rgb_images_train_at_64px():
    p = make_plan(info(5000, side=96, chans=3), cpu({MED_B: 500.0, MED_A: 90.0}), {})
    assert p.values["data.img_size"] == 64 and p.values["model.name"] == "vit_nano_convstem_patch16_64"
    assert p.values["data.crop_pct"] == 1.0


def test_photos_offline_train_from_scratch_at_64px():
    p = make_plan(info(3000, side=320, chans=3, classes=5), cpu({MED_B: 300.0, MED_A: 80.0}), {})
    assert p.values["model.name"].startswith("vit_nano_convstem") and p.values["data.img_size"] == 64
    assert "from scratch" in p.reasons["model.name"] and "model.init" not in p.values
    assert "data.crop_pct" not in p.values  # photos keep the centre crop


def test_photos_with_pretrained_weights_fine_tune():
    hub = "timm/deit_tiny_patch16_224.fb_in1k"
    # 60 img/s at 224 px: 60 * 540 / 3000 = 10.8 epochs, enough (>= 10) for the pretrained resolution.
    p = make_plan(info(3000, side=320, chans=3, classes=5), cpu({DEIT: 60.0, DEIT_HALF: 240.0}, pretrained=hub), {})
    v = p.values
    assert v["model.name"] == "deit_tiny_patch16_224" and v["model.init"] == hub and v["data.img_size"] == 224
    # 2.5e-4 at batch 128, sqrt-scaled to 32 (1.25e-4), written per 512: 2e-3.
    assert v["optim.layer_decay"] == 0.65 and v["optim.lr"] == pytest.approx(2e-3)
    assert v["schedule.name"] == "cosine" and v["data.batch_size"] == 32
    assert "fine-tune" in p.reasons["model.name"] and "its own 224 px" in p.reasons["model.name"]


def test_pretrained_resolution_follows_the_budget():
    """Half the pretrained resolution when the full one would get fewer than 10 passes; the reason says so."""
    hub = "timm/deit_tiny_patch16_224.fb_in1k"
    p = make_plan(info(3000, side=320, chans=3, classes=5), cpu({DEIT: 30.0, DEIT_HALF: 120.0}, pretrained=hub), {})
    assert p.values["model.name"] == "deit_tiny_patch16_224" and p.values["data.img_size"] == 112
    why = p.reasons["model.name"]
    assert "112 px, half its 224 px" in why and "~5.4 epochs" in why  # 30 * 540 / 3000 at 224 px
    assert "~22 epochs fit at 120 img/s" in why  # 120 * 540 / 3000 = 21.6 at 112 px
    # Nothing timed at 224 px (the calibration stops when 112 px already falls short): still 112.
    short = make_plan(info(3000, side=320, chans=3, classes=5), cpu({DEIT_HALF: 40.0}, pretrained=hub), {})
    assert short.values["data.img_size"] == 112 and "fewer epochs would fit" in short.reasons["model.name"]


@pytest.mark.parametrize("side", [49, 96, 128])
def test_medium_photos_look_for_pretrained_weights_too(side):
    hub = "timm/deit_tiny_patch16_224.fb_in1k"
    p = make_plan(info(5000, side=side, chans=3), cpu({DEIT: 200.0, DEIT_HALF: 600.0}, pretrained=hub), {})
    assert p.values["model.name"] == "deit_tiny_patch16_224" and p.values["model.init"] == hub
    assert p.values["data.crop_pct"] == 1.0  # up to 128 px: the whole image at evaluation
    assert plan_mod.candidates(info(5000, side=side), hub)[0].pretrained == hub
    # Small images never do: they train from scratch near their own size.
    assert all(c.pretrained is None for c in plan_mod.candidates(info(5000, side=48), hub))


def test_one_size_rule():
    """The plan's candidates and the model a run without the plan builds follow the same thresholds."""
    for side, kind in [(28, "small"), (40, "small"), (48, "small"), (49, "medium"), (128, "medium"),
                       (129, "large"), (500, "large")]:
        assert plan_mod.image_class(side) == kind
        name, img = plan_mod.default_model(side)
        if kind == "large":
            assert (name, img) == ("deit_tiny_patch16_224", 224)
        else:
            assert img == (32 if kind == "small" else 64)
            assert (name, img) in {(c.name, c.img_size) for c in plan_mod.candidates(info(side=side), None)}


def test_user_init_gets_the_fine_tuning_recipe():
    """``--init FILE`` is fine-tuned (lower lr, layer decay, clipping, cosine), never planned from scratch,
    and the plan builds the architecture the file records."""
    user = {"model.init": "run/model.safetensors"}
    recorded = Candidate("test_vit", 32, (("depth", 1),))
    c = Calibration("cpu", {"test_vit@32": 500.0}, 0.0, init=recorded)
    p = make_plan(info(8000, side=28), c, user)
    v = p.values
    assert v["model.name"] == "test_vit" and v["data.img_size"] == 32 and v["model.args"] == {"depth": 1}
    assert "model.init=run/model.safetensors records" in p.reasons["model.name"] and "model.init" not in v
    assert v["schedule.name"] == "cosine" and v["optim.layer_decay"] == 0.65 and v["optim.clip_grad"] == 1.0
    assert v["optim.lr"] == pytest.approx(2e-3) and v["data.batch_size"] == 32  # 2.5e-4 at 128, as above
    assert "fine-tuning" in p.reasons["optim.lr"] and "from scratch" not in p.reasons["optim.lr"]
    # Weights of an architecture the source does not record: the plan's own model, still fine-tuned.
    other = make_plan(info(8000, side=28), cpu({SMALL_B: 450.0, SMALL_A: 150.0}), user)
    assert other.values["schedule.name"] == "cosine" and "from scratch" not in other.reasons["optim.lr"]
    photos = make_plan(info(8000, side=320, chans=3), cpu({DEIT: 200.0, DEIT_HALF: 600.0}), user)
    assert photos.values["model.name"] == "deit_tiny_patch16_224" and "from model.init" in photos.reasons["model.name"]
    # On few images the same start trains LoRA instead (plan_peft), at its own lr.
    few = make_plan(info(1000, side=28), c, user)
    assert few.values["peft.method"] == "lora" and few.values["schedule.name"] == "cosine"
    assert "optim.layer_decay" not in few.values


def test_gpu_plan_is_sized_in_epochs():
    c = Calibration("cuda", {SMALL_B: 5000.0, SMALL_A: 3000.0}, 0.0)
    p = make_plan(info(10_000, side=32, chans=3), c, {})
    assert "engine.time_budget" not in p.values
    assert p.values["engine.epochs"] == 150 and p.values["data.batch_size"] == 256
    assert p.values["data.auto_augment"] is not None and p.values["data.mixup"] > 0  # 150 epochs: 70% of DeiT


def test_imbalance_reported_and_rare_classes_warned():
    p = make_plan(info(2000, classes=3, counts=[1500, 495, 5]), cpu({SMALL_B: 400.0, SMALL_A: 150.0}), {})
    text = "\n".join(p.lines())
    assert "c0=1500, c1=495, c2=5" in text and "imbalanced 300.0:1" in text
    assert "fewer than 10" in text and "'c2'" in text
    balanced = make_plan(info(2000, classes=2), cpu({SMALL_B: 400.0, SMALL_A: 150.0}), {})
    assert "balanced;" in "\n".join(balanced.lines())


def test_imbalance_above_the_stated_ratio_balances_the_classes():
    rates = cpu({SMALL_B: 400.0, SMALL_A: 150.0})
    p = make_plan(info(2000, classes=3, counts=[1500, 495, 5]), rates, {})
    assert p.values["data.balance"] == plan_mod.BALANCE == "sampler"
    assert "300.0:1 (> 3:1)" in p.reasons["data.balance"]
    # The ratio is largest over smallest class; at exactly 3:1 nothing changes, just above it does.
    assert "data.balance" not in make_plan(info(400, classes=2, counts=[300, 100]), rates, {}).values
    assert make_plan(info(404, classes=2, counts=[303, 100]), rates, {}).values["data.balance"] == "sampler"
    assert "data.balance" not in make_plan(info(2000, classes=2), rates, {}).values
    # The user's choice stands.
    assert "data.balance" not in make_plan(info(2000, classes=3, counts=[1500, 495, 5]), rates,
                                           {"data.balance": "loss"}).values


def test_early_stop_only_where_the_validation_set_can_tell():
    """``engine.plateau_patience`` for runs whose length the plan sets, with >= 200 validation images and
    room for 4 evaluations (at most one per epoch) in the patience window."""
    rates = cpu({SMALL_B: 450.0, SMALL_A: 150.0})
    big = make_plan(info(8000), rates, {})  # 888 validation images, ~30 epochs
    assert big.values["engine.plateau_patience"] == 0.25
    assert "888 validation images" in big.reasons["engine.plateau_patience"]
    small = make_plan(info(1791), rates, {})  # 1791 // 9 = 199 validation images: too few to tell
    assert "engine.plateau_patience" not in small.values
    assert make_plan(info(1800), rates, {}).values["engine.plateau_patience"] == 0.25  # 200 images
    # A short run (~4 epochs) has no room for 4 evaluations in a quarter of it.
    assert "engine.plateau_patience" not in make_plan(info(60_000), cpu({SMALL_B: 400.0}), {}).values
    # A length the user chose is kept.
    for key, value in (("engine.epochs", 40), ("engine.time_budget", "10m"), ("engine.max_steps", 5000)):
        assert "engine.plateau_patience" not in make_plan(info(8000), rates, {key: value}).values
    # A validation split of the user's own, large beside the training set: 16 evaluations of 4,086 images,
    # flipped too, at 2,000 img/s take ~65 s of a 600 s run (> 5%): no watch, and the plan says why.
    import dataclasses

    lt = dataclasses.replace(info(5000), n_val=4086)
    measured = Calibration("cpu", {SMALL_B: 450.0}, 0.0, None, eval_img_per_s={SMALL_B: 2000.0})
    costly = make_plan(lt, measured, {})
    assert "engine.plateau_patience" not in costly.values and costly.values["engine.eval_every"] == 25
    assert any("no early stop" in n and "4,086" in n for n in costly.notes)
    # A fast enough evaluation (16 x 4,086 / 9,000 img/s ~ 15 s with flips: 2.4%) is watched.
    fast = Calibration("cpu", {SMALL_B: 450.0}, 0.0, None, eval_img_per_s={SMALL_B: 9000.0})
    assert make_plan(lt, fast, {}).values["engine.plateau_patience"] == 0.25
    # On a GPU (150 epochs): every 9 epochs, 4 evaluations per quarter of the run, instead of every 15.
    gpu = make_plan(info(10_000, side=32, chans=3), Calibration("cuda", {SMALL_B: 5000.0, SMALL_A: 3000.0}, 0.0), {})
    assert gpu.values["engine.plateau_patience"] == 0.25 and gpu.values["engine.eval_every"] == 9


def test_plan_never_touches_user_keys():
    user = {"model.name": "vit_nano_convstem_patch4_32", "data.batch_size": 64, "data.mixup": 0.5,
            "engine.time_budget": "2m", "optim.lr": 1e-3, "model.args": {}}
    p = make_plan(info(8000), cpu({SMALL_A: 150.0, SMALL_B: 450.0}), user)
    assert not set(p.values) & set(user)
    # The user's budget and batch feed the choices: 150 * 0.9 * 120 / 8000 = 2 epochs -> light.
    assert p.values["data.auto_augment"] is None and p.values["data.cutmix"] == 0.0


def test_flip_averaging_only_where_training_flips_and_the_objective_is_the_plan_s():
    assert make_plan(info(8000), cpu({SMALL_B: 450.0}), {"data.hflip": 0.0}).values.get("objective.tta") is None
    assert "objective.tta" not in make_plan(info(8000), cpu({SMALL_B: 450.0}), {"objective.name": "supervised"}).values
    assert "objective.tta" not in make_plan(info(8000), cpu({SMALL_B: 450.0}), {"objective.tta": "none"}).values
    # The objective section is a dict: the plan's key lands in it, and the config stays valid.
    cfg = load_config(None, ["data.path=/data/mine"])
    p = make_plan(info(8000), cpu({SMALL_A: 150.0, SMALL_B: 450.0}), {})
    apply_plan(cfg, p)
    assert cfg.objective == {"name": "supervised", "tta": "hflip"} and cfg.engine.channels_last is True
    from vitkit.config import validate

    validate(cfg)


def test_load_config_tracks_user_keys_and_plan_is_applied_around_them():
    cfg = load_config(None, ["data.path=/data/mine", "data.mixup=0.3", "model.args.stem_width=96",
                             "engine.time_budget=3m"])
    assert uses_plan(cfg)
    assert user_keys(cfg) == {"data.path", "data.mixup", "model.args", "engine.time_budget"}
    assert not uses_plan(load_config(None, ["data.path=shapes"]))
    assert not uses_plan(load_config("cifar10_fast", ["data.path=/data/mine"]))
    assert uses_plan(load_config(None, ["data.path=/data/mine"]))
    assert not uses_plan(load_config(None, ["data.path=/data/mine"], plan=False))
    from vitkit.plan import user_values

    user = user_values(cfg, user_keys(cfg))
    p = make_plan(info(8000), cpu({SMALL_A: 150.0, SMALL_B: 450.0}), user)
    apply_plan(cfg, p)
    assert cfg.data.mixup == 0.3 and cfg.model.args == {"stem_width": 96} and cfg.engine.time_budget == "3m"
    assert cfg.model.name == p.values["model.name"] and cfg.data.batch_size == p.values["data.batch_size"]


# ---------------------------------------------------------------------- pretrained weights in the hub cache

def test_find_pretrained_uses_the_local_cache_offline(hub_cache):
    import vitkit

    assert find_pretrained() is None  # offline and nothing cached: train from scratch
    hub_id = vitkit.get_model_card(plan_mod.PRETRAINED_MODEL).hub_id
    (hub_cache(hub_id) / "model.safetensors").write_bytes(b"x")
    assert find_pretrained() == hub_id


# ---------------------------------------------------------------------- the no-flag path end to end


def draw_patterns(root, per_class=40, size=40, seed=0):
    """A class folder of horizontal stripes, vertical stripes and checkerboards (random period, phase, colours)."""
    rng = random.Random(seed)
    for name in ("hstripes", "vstripes", "checker"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            bg, fg = (tuple(rng.randrange(lo, lo + 80) for _ in range(3)) for lo in (0, 170))
            img = Image.new("RGB", (size, size), bg)
            d = ImageDraw.Draw(img)
            period, phase = rng.randrange(6, 11), rng.randrange(0, 6)
            for a in range(-phase, size, period):
                for b in range(-phase, size, period) if name == "checker" else [0]:
                    if name == "hstripes":
                        d.rectangle([0, a, size, a + period // 2 - 1], fill=fg)
                    elif name == "vstripes":
                        d.rectangle([a, 0, a + period // 2 - 1, size], fill=fg)
                    elif ((a + b) // period) % 2 == 0:
                        d.rectangle([a, b, a + period - 1, b + period - 1], fill=fg)
            img.save(root / name / f"{i}.png")


def test_inspect_counts_classes(tmp_path):
    draw_patterns(tmp_path / "data", per_class=10)
    got = inspect_dataset(str(tmp_path / "data"))
    assert got.classes == ("checker", "hstripes", "vstripes") and got.class_counts == (9, 9, 9)
    assert got.typical_size == (40, 40) and got.in_chans == 3


def test_no_flag_run_plans_learns_and_records_the_plan(tmp_path):
    """The plan path of ``vitkit train --data DIR``; a tiny model keeps it fast, and 60 epochs
    switch augmentation on (RandAugment, label smoothing)."""
    from vitkit.train import train

    draw_patterns(tmp_path / "data", per_class=60)
    cfg = load_config(None, [f"data.path={tmp_path / 'data'}", "model.name=test_vit", "engine.epochs=60",
                             f"engine.out_dir={tmp_path / 'run'}", "engine.plots=false", "engine.tensorboard=false",
                             "data.num_workers=0"])
    summary = train(cfg, verbose=False)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    plan = run["plan"]
    assert plan["data.auto_augment"]["value"] == "rand-m5-mstd0.5-inc1"
    assert plan["data.label_smoothing"]["value"] == 0.1 and plan["data.batch_size"]["value"] == 16
    assert plan["objective.tta"]["value"] == "hflip" and run["objective"]["tta"] == "hflip"
    assert not {"model.name", "engine.epochs", "data.num_workers", "engine.time_budget"} & set(plan)
    assert all(set(v) == {"value", "reason"} and v["reason"] for v in plan.values())
    assert run["class_counts"] == {"checker": 54, "hstripes": 54, "vstripes": 54}
    assert summary["stopped"] == "completed" and summary["epochs"] == 60
    assert summary["val_acc"] > 0.6  # chance is 1/3

    from vitkit.evaluate import evaluate

    result = evaluate(str(tmp_path / "run"), str(tmp_path / "data"), num_workers=0)
    assert result["tta"] == "hflip"  # as the run evaluated: the same score
    assert result["top1"] == pytest.approx(summary["val_acc"], abs=0.01)
    # 6 val images per class: balanced accuracy is the plain mean of the per-class accuracies.
    assert result["balanced_acc"] == pytest.approx(sum(result["per_class"].values()) / 3)
