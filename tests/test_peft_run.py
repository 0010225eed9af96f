"""PEFT in a training run: the ``peft:`` config section, the model the run builds (the base frozen
after ``model.init`` is loaded), every method trained end to end through the one Trainer with the
frozen weights untouched and the adapter file written, bitwise resume, and the no-flag plan's choice."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import assert_same_run, crash_and_resume, run_vitkit, write_class_folder
from safetensors.torch import load_file

from vitkit.config import load_config, user_keys
from vitkit.data.inspect import DatasetInfo
from vitkit.errors import ConfigError
from vitkit.peft.config import METHODS
from vitkit.plan import Calibration, make_plan
from vitkit.plan_peft import PEFT_LR_128, PEFT_MAX_IMAGES

ENGINE = ["engine.amp=none", "engine.tensorboard=false", "engine.plots=false", "data.num_workers=0",
          "engine.device=cpu", "engine.log_every=1"]
# test_vit: embed 64, depth 2, 2 heads, patch 8 at 32 px; qkv is a 64 -> 192 Linear with a bias.
D, DEPTH, QKV_OUT = 64, 2, 192


@pytest.fixture(scope="module")
def init_file(tmp_path_factory):
    """Pretrained-looking weights: a test_vit with a 10-class head (the runs below have 6 classes)."""
    from vitkit import create_model
    from vitkit.weights_io import save_weights

    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("init") / "base.safetensors"
    save_weights(create_model("test_vit", num_classes=10, img_size=32), path)
    return path


def _cfg(out, *extra, init=None, steps=2):
    overrides = ["data.path=shapes:96", "model.name=test_vit", "data.img_size=32", "data.batch_size=16",
                 "data.eval_batch_size=32", "data.auto_augment=null", "data.mixup=0", "data.cutmix=0",
                 f"engine.out_dir={out}", f"engine.max_steps={steps}", "engine.epochs=4", *ENGINE, *extra]
    if init is not None:
        overrides.append(f"model.init={init}")
    return load_config(overrides=overrides, plan=False)


# ---- the config section -------------------------------------------------------------------------------


def test_peft_section_parses_and_none_means_every_weight():
    cfg = load_config(overrides=["peft.method=lora", "peft.lora_rank=4", "peft.lora_targets=[qkv,fc2]"], plan=False)
    assert cfg.peft.method == "lora" and cfg.peft.lora_rank == 4 and list(cfg.peft.lora_targets) == ["qkv", "fc2"]
    assert load_config(overrides=[], plan=False).peft.method is None
    off = load_config(overrides=["peft.method=none", "data.path=/somewhere"])
    # Set by the user: off, and the plan must not choose a method for this run.
    assert off.peft.method is None and "peft.method" in user_keys(off)


@pytest.mark.parametrize("bad, needle", [("peft.method=loraa", "vpt_shallow"), ("peft.lora_rank=0", "lora_rank"),
                                         ("peft.nope=1", "peft.nope")])
def test_bad_peft_values_are_config_errors(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=[bad], plan=False)


# ---- the model a run builds ---------------------------------------------------------------------------


def test_build_model_freezes_the_loaded_base_and_counts_method_and_head(init_file):
    from vitkit.train import ModelChoice, build_model

    cfg = _cfg("unused", "peft.method=lora", "peft.lora_rank=4", init=init_file)
    model = build_model(ModelChoice("test_vit", 32, 3, 6, ""), cfg, verbose=False)
    base = load_file(init_file)
    info = model.peft_info
    # LoRA on qkv: A (r x 64) and B (192 x r) per block; the head is a fresh 6-class Linear on 64 features.
    assert info.method == "lora" and info.n_method == DEPTH * 4 * (D + QKV_OUT) == 2048
    assert info.n_head == D * 6 + 6
    assert info.n_base == sum(v.numel() for k, v in base.items() if not k.startswith("head."))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.qkv.lora_{m}" for i in range(DEPTH) for m in "AB"} | {"head.weight", "head.bias"}
    # The frozen base holds the init file's weights (loaded before freezing), the head was replaced.
    sd = model.state_dict()
    for k, v in base.items():
        if not k.startswith("head."):
            assert torch.equal(sd[k], v), k
    assert sd["head.weight"].shape == (6, D)
    # The record is the base's own: the same init gives the same sha256, another init another one.
    again = build_model(ModelChoice("test_vit", 32, 3, 6, ""), cfg, verbose=False)
    assert again.peft_info.base_sha256 == info.base_sha256
    other = build_model(ModelChoice("test_vit", 32, 3, 6, ""), _cfg("unused", "peft.method=lora"), verbose=False)
    assert other.peft_info.base_sha256 != info.base_sha256


def test_peft_on_dense_data_is_a_config_error(tmp_path):
    from vitkit.train import build_run

    cfg = load_config(overrides=["data.path=scenes:16", "model.name=test_vit", "model.head=linear",
                                 "data.img_size=32", "peft.method=lora", *ENGINE], plan=False)
    with pytest.raises(ConfigError, match="peft.method=lora applies to classification"):
        build_run(cfg, verbose=False)


# ---- runs through the Trainer --------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_end_to_end_and_leaves_the_base_untouched(tmp_path, init_file, method):
    from vitkit.train import build_run, train

    extra = (f"peft.method={method}", "peft.vpt_prompts=2", "peft.adapter_width=8")
    # The optimizer holds exactly the method's parameters and the head: frozen ones stay out of it.
    cfg = _cfg(tmp_path / "probe", *extra, init=init_file)
    torch.manual_seed(cfg.engine.seed)  # as train() does: this build starts where the run below starts
    trainer, info = build_run(cfg, verbose=False)
    model = trainer.objective.export_model()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    in_optim = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optim == trainable and 0 < len(trainable) < len(list(model.parameters()))
    assert info["peft"]["method"] == method and info["peft"]["n_method"] == model.peft_info.n_method
    start = {k: v.clone() for k, v in model.state_dict().items()}
    params, head = list(model.peft_info.params), list(model.peft_info.head)
    del trainer, model

    out = tmp_path / "run"
    summary = train(_cfg(out, *extra, init=init_file), verbose=False)
    assert summary["steps"] == 2 and math.isfinite(summary["val_loss"])
    rec = json.loads((out / "run.json").read_text())["peft"]
    assert rec["method"] == method and rec["base_source"] == str(init_file) and len(rec["base_sha256"]) == 64
    assert rec["pct"] == pytest.approx(100 * rec["n_method"] / rec["n_base"])
    assert summary["peft"]["method"] == method
    final, base = load_file(out / "model.safetensors"), load_file(init_file)
    # Every frozen base tensor is bitwise the init file's after training (no update, no weight decay).
    for k, v in base.items():
        if k not in params and k not in head:
            assert torch.equal(final[k], v), f"{method}: frozen {k} moved"
    # Training moved the head and the method's own weights (after 2 steps even LoRA's A: B is non-zero).
    for k in params + head:
        assert not torch.equal(final[k], start[k]), f"{method}: {k} did not train"
    # The adapter file holds the trained tensors, as trained, and is smaller than the model's.
    adapter = load_file(out / "adapter.safetensors")
    assert set(params) | set(head) <= set(adapter)
    for k in adapter:
        assert torch.equal(adapter[k], final[k]), k
    assert (out / "adapter.safetensors").stat().st_size < (out / "model.safetensors").stat().st_size


@pytest.mark.parametrize("method", ["lora", "vpt_deep"])
def test_peft_run_resumes_bitwise(tmp_path, init_file, method):
    from vitkit.train import build_run

    def trainer(out, hooks=()):
        cfg = _cfg(out, f"peft.method={method}", "peft.vpt_prompts=2", "engine.ckpt_every_steps=2", init=init_file,
                   steps=4)
        torch.manual_seed(cfg.engine.seed)
        tr, _ = build_run(cfg, verbose=False)
        tr.hooks = list(hooks)
        return tr

    full = trainer(tmp_path / "full")
    start = {k: v.clone() for k, v in full.objective.state_dict().items()}
    full.fit()
    assert full.step == 4
    resumed = crash_and_resume(trainer, tmp_path / "run", 3, latest=2)
    assert_same_run(full, resumed)
    # The comparison is not vacuous: the method's weights moved from their initialisation.
    end = full.objective.state_dict()
    assert any(not torch.equal(start[k], end[k]) for k in end if "lora_B" in k or "vpt" in k)


# ---- the no-flag plan ------------------------------------------------------------------------------------

SMALL_A, SMALL_B = "vit_nano_convstem_patch4_32@32", "vit_nano_convstem_patch8_64@32"
DEIT = "deit_tiny_patch16_224@224"


def scan(n, side=28, chans=1, classes=10):
    return DatasetInfo(num_classes=classes, in_chans=chans, typical_size=(side, side), n_train=n, n_val=n // 9,
                       format="folder", classes=tuple(f"c{i}" for i in range(classes)),
                       class_counts=tuple([n // classes] * classes))


def cpu(rates, pretrained=None):
    return Calibration("cpu", dict(rates), 0.0, pretrained)


def test_plan_chooses_lora_to_fine_tune_on_few_images_and_says_why():
    p = make_plan(scan(1000), cpu({SMALL_B: 450.0, SMALL_A: 300.0}), {"model.init": "runs/src/model.safetensors"})
    v = p.values
    assert v["peft.method"] == "lora"
    why = p.reasons["peft.method"]
    assert "1,000 images" in why and f"{PEFT_MAX_IMAGES:,}" in why and "peft.method=none" in why
    assert "peft.method=lora" in "\n".join(p.lines())
    # A frozen base: the PEFT lr (AdamW 1.4e-3 at batch 128, sqrt-scaled to 32 = 7e-4, per 512: x16), no layer decay.
    assert v["data.batch_size"] == 32
    assert v["optim.lr"] == pytest.approx(PEFT_LR_128 * math.sqrt(32 / 128) * 512 / 32, rel=1e-2)
    assert "optim.layer_decay" not in v and v["schedule.name"] == "cosine" and v["optim.clip_grad"] == 1.0


def test_plan_fine_tunes_every_weight_on_more_images_or_when_told():
    init = {"model.init": "base.safetensors"}
    big = make_plan(scan(PEFT_MAX_IMAGES + 1), cpu({SMALL_B: 450.0, SMALL_A: 300.0}), init)
    assert "peft.method" not in big.values and big.values["optim.layer_decay"] == 0.65
    assert any(f"{PEFT_MAX_IMAGES:,}" in n and "every weight" in n for n in big.notes)
    # peft.method=none from the user: full fine-tuning with layer decay, nothing planned for peft.
    told = make_plan(scan(500), cpu({SMALL_B: 450.0, SMALL_A: 300.0}), {**init, "peft.method": None})
    assert "peft.method" not in told.values and told.values["optim.layer_decay"] == 0.65
    # The user's method: kept, and trained at the PEFT lr without decay.
    bitfit = make_plan(scan(5000), cpu({SMALL_B: 450.0, SMALL_A: 300.0}), {**init, "peft.method": "bitfit"})
    assert "peft.method" not in bitfit.values and "optim.layer_decay" not in bitfit.values
    assert "bitfit" in bitfit.reasons["optim.lr"]
    # No pretrained weights: from scratch, every weight.
    scratch = make_plan(scan(500), cpu({SMALL_B: 450.0, SMALL_A: 300.0}), {})
    assert "peft.method" not in scratch.values and scratch.values["schedule.name"] == "onecycle"


def test_plan_peft_for_its_own_pretrained_photos_model_and_linear_where_lora_does_not_apply():
    hub = "timm/deit_tiny_patch16_224.fb_in1k"
    p = make_plan(scan(800, side=320, chans=3, classes=5), cpu({DEIT: 30.0}, pretrained=hub), {})
    assert p.values["model.init"] == hub and p.values["peft.method"] == "lora"
    # An MLP-Mixer has no attention qkv: the plan falls back to the linear probe and says so.
    user = {"model.init": "mixer.safetensors", "model.name": "test_mixer", "data.img_size": 32}
    q = make_plan(scan(800, side=32, chans=3), cpu({"test_mixer@32": 500.0, SMALL_B: 450.0}), user)
    assert q.values["peft.method"] == "linear" and "test_mixer" in q.reasons["peft.method"]


def test_cli_plan_prints_the_choice_the_trainable_count_and_the_adapter(tmp_path, init_file):
    """`vitkit train --init FILE --data DIR` on 60 images: LoRA planned with its reason, the count printed."""
    write_class_folder(tmp_path / "data", per_class=20)
    run = tmp_path / "run"
    r = run_vitkit("train", "--init", init_file, "--data", tmp_path / "data", "--out", run, "--model", "test_vit",
                   "data.img_size=32", "engine.max_steps=2", "data.auto_augment=null", *ENGINE, check=True)
    assert "peft.method=lora  # fine-tuning pretrained weights on 54 images" in r.stdout, r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("peft lora"))
    assert "trainable" in line and f"{DEPTH * 8 * (D + QKV_OUT) + 3 * D + 3:,}" in line, line
    assert "adapter (lora" in r.stdout and (run / "adapter.safetensors").is_file()


@pytest.mark.parametrize("model_name, norm_stats", [("test_vit", "freeze"), ("test_vit_convstem", "freeze"),
                                                   ("test_vit_convstem", "save")])
def test_run_products_agree_base_plus_adapter_equals_the_run(tmp_path, model_name, norm_stats):
    """What a LoRA run leaves reproduces it: the init base plus adapter.safetensors equals load_model(run),
    with a conv stem's BatchNorm statistics frozen, or trained and saved in the adapter."""
    from vitkit import create_model, load_model
    from vitkit.convert import load_weights
    from vitkit.peft.io import load_adapter
    from vitkit.train import train
    from vitkit.weights_io import save_weights

    torch.manual_seed(3)
    init = save_weights(create_model(model_name, num_classes=10, img_size=32), tmp_path / "base.safetensors")
    out = tmp_path / "run"
    train(_cfg(out, f"model.name={model_name}", "peft.method=lora", "peft.lora_rank=4",
               f"peft.norm_stats={norm_stats}", init=init), verbose=False)
    final, start = load_file(out / "model.safetensors"), load_file(init)
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    assert bool(stats) == (model_name == "test_vit_convstem")
    for k in stats:  # frozen: as loaded; saved: updated by training
        assert torch.equal(final[k], start[k]) == (norm_stats == "freeze"), k
    base = create_model(model_name, num_classes=6, img_size=32)
    load_weights(base, init, verbose=False)  # the backbone from the init file, a 6-class head to be filled
    load_adapter(base, out / "adapter.safetensors")
    run = load_model(out).model
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = base.eval()(x), run.eval()(x)
    assert torch.equal(a, b)
    # LoRA moved the model away from the base it started on (the comparison is not vacuous).
    plain = create_model(model_name, num_classes=6, img_size=32)
    load_weights(plain, init, verbose=False)
    plain.load_state_dict({k: v for k, v in base.state_dict().items() if k.startswith("head.")}, strict=False)
    with torch.no_grad():
        assert not torch.allclose(plain.eval()(x), a, atol=1e-6)


def test_resume_refuses_other_peft_settings():
    """A checkpoint holds the trainable weights of its own method: resuming with another is refused up front."""
    from vitkit.rundir import check_resume_config

    saved = {"peft": {"method": "lora", "lora_rank": 8}, "optim": {"lr": 1e-3}}
    assert check_resume_config(saved, {"peft": {"method": "lora", "lora_rank": 8}, "optim": {"lr": 1e-3}}) == []
    with pytest.raises(ConfigError, match=r"peft\.lora_rank.*peft\.method|peft\.method"):
        check_resume_config(saved, {"peft": {"method": "bitfit", "lora_rank": 4}, "optim": {"lr": 1e-3}})
