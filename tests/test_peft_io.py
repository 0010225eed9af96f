"""PEFT files: adapters saved apart from their base and refused on another one, `vitkit export --merge`, and
`load_model` of a PEFT run; base + adapter == merged == the run."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict

import pytest
import torch
import yaml
from helpers import lazy_peer
from helpers import run_vitkit as vitkit
from safetensors.torch import load_file

from vitkit import create_model, load_model, save_weights
from vitkit.errors import ConfigError, WeightsError
from vitkit.export import export
from vitkit.peft import PeftConfig, apply_peft
from vitkit.peft.io import adapter_size, load_adapter, merge_peft, save_adapter

timm = lazy_peer("timm")


def _train_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every trainable tensor (the method's and the head's) as training would, so that none is at its init
    (LoRA's B starts at zero: an untouched adapter would equal the base and prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _x(size: int = 32, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _peft_run(tmp_path, peft: PeftConfig, name: str = "test_vit", img_size: int = 32, num_classes: int = 3):
    """A run directory as a PEFT run leaves it (config.yaml with its peft section, run.json with the base's
    sha256, model.safetensors = base + method tensors, adapter.safetensors), from a base saved beside it."""
    torch.manual_seed(0)
    base = create_model(name, num_classes=num_classes, img_size=img_size).eval()
    base_file = save_weights(base, tmp_path / "base" / "model.safetensors")
    model = copy.deepcopy(base)
    info = apply_peft(model, peft)
    _train_like(model)
    run = tmp_path / "run"
    run.mkdir()
    classes = [f"c{i}" for i in range(num_classes)]
    (run / "run.json").write_text(json.dumps({
        "model": name, "num_classes": num_classes, "img_size": img_size, "in_chans": 3, "classes": classes,
        "mean": [0.5] * 3, "std": [0.25] * 3,
        "peft": {"method": info.method, "n_method": info.n_method, "n_head": info.n_head, "n_base": info.n_base,
                 "pct": info.pct, "base_sha256": info.base_sha256},
    }))
    (run / "config.yaml").write_text(yaml.safe_dump({"peft": asdict(peft), "engine": {"seed": 0}}))
    save_weights(model, run / "model.safetensors")
    save_adapter(model, run / "adapter.safetensors", base_source=str(base_file))
    return run, model, base_file, info


def test_lora_adapter_of_vit_small_is_068_percent_of_the_base(tmp_path):
    model = create_model("vit_small_patch16_224", num_classes=10)
    apply_peft(model, PeftConfig(method="lora", lora_rank=8, lora_targets=["qkv"]))
    path = save_adapter(model, tmp_path / "adapter.safetensors", base_source="vit_small_patch16_224 (random init)")
    size = adapter_size(path)
    lora = 12 * 8 * (384 + 3 * 384)  # 12 blocks x rank x (in + out) of qkv
    head = 384 * 10 + 10
    # ViT-S/16 without its head: 22,050,664 parameters with the 1000-class head (timm), minus 384 * 1000 + 1000.
    n_base = 22_050_664 - 385_000
    assert (size["n_method"], size["n_head"], size["n_base"], size["n_stats"]) == (lora, head, n_base, 0)
    assert lora == 147_456 and round(size["pct"], 2) == 0.68
    tensors = load_file(path)
    assert sum(v.numel() for k, v in tensors.items() if not k.startswith("head.")) == lora
    assert all(".lora_" in k for k in tensors if not k.startswith("head."))
    # float32 tensors plus a header of names and config: far from the base's 87 MB
    assert 4 * (lora + head) < size["bytes"] < 4 * (lora + head) + 20_000


def test_adapter_loads_only_onto_its_base_and_reproduces_the_model(tmp_path):
    torch.manual_seed(0)
    base = create_model("test_vit", num_classes=5).eval()
    base_state = copy.deepcopy(base.state_dict())
    tuned = copy.deepcopy(base)
    tuned.reset_classifier(3)  # the adapter brings its own head; its class count need not be the base's
    info = apply_peft(tuned, PeftConfig(method="lora", lora_rank=4, lora_targets=["qkv", "fc2"]))
    _train_like(tuned)
    path = save_adapter(tuned, tmp_path / "adapter.safetensors", base_source="pretrain-run/model.safetensors")

    fresh = create_model("test_vit", num_classes=5)
    fresh.load_state_dict(base_state)
    loaded = load_adapter(fresh, path)
    assert fresh.num_classes == 3 and loaded.method == "lora" and loaded.base_sha256 == info.base_sha256
    assert sorted(loaded.params) == sorted(info.params)
    plain = copy.deepcopy(base)  # the base with the tuned head but no LoRA: the adapter's low-rank part matters
    plain.reset_classifier(3)
    plain.head.load_state_dict({k.removeprefix("head."): v for k, v in tuned.state_dict().items()
                                if k.startswith("head.")})
    with torch.no_grad():
        assert torch.equal(fresh.eval()(_x()), tuned(_x()))
        assert not torch.allclose(plain.eval()(_x()), tuned(_x()), atol=1e-3)

    torch.manual_seed(1)
    other = create_model("test_vit", num_classes=5)
    with pytest.raises(ConfigError) as e:
        load_adapter(other, path)
    msg = str(e.value)
    assert f"trained on base {info.base_sha256[:12]} (pretrain-run/model.safetensors)" in msg
    assert "this model is" in msg and "onto the base it was trained on" in msg
    assert getattr(other, "peft_info", None) is None  # refused before anything changed
    with pytest.raises(ConfigError, match="already has lora applied"):
        load_adapter(fresh, path)
    with pytest.raises(WeightsError, match="not a vitkit adapter file"):
        load_adapter(other, save_weights(other, tmp_path / "plain.safetensors"))


def test_batchnorm_statistics_travel_with_the_adapter_only_when_saved(tmp_path):
    torch.manual_seed(0)
    base = create_model("test_levit", num_classes=3).eval()
    base_state = copy.deepcopy(base.state_dict())
    for norm_stats in ("save", "freeze"):
        tuned = copy.deepcopy(base)
        apply_peft(tuned, PeftConfig(method="bitfit", norm_stats=norm_stats))
        _train_like(tuned.train())
        with torch.no_grad():
            for _ in range(2):
                tuned.train()(_x(32, 4) * 2 + 1)  # moves the running statistics unless they are frozen
        tuned.eval()
        path = save_adapter(tuned, tmp_path / f"{norm_stats}.safetensors")
        stats = [k for k in load_file(path) if k.endswith(("running_mean", "running_var"))]
        moved = any(not torch.equal(tuned.state_dict()[k], base_state[k])
                    for k in base_state if k.endswith("running_mean"))
        fresh = create_model("test_levit", num_classes=3)
        fresh.load_state_dict(base_state)
        load_adapter(fresh, path)
        with torch.no_grad():
            assert torch.equal(fresh.eval()(_x()), tuned(_x()))
        if norm_stats == "save":
            assert stats and moved and adapter_size(path)["n_stats"] > 0
        else:
            assert not stats and not moved


def test_load_model_of_a_lora_run_equals_base_plus_adapter_and_merged(tmp_path):
    run, model, base_file, info = _peft_run(tmp_path, PeftConfig(method="lora", lora_targets=["qkv", "fc1"]))
    with torch.no_grad():
        expected = model(_x())
    lm = load_model(run, device="cpu")
    assert lm.model.peft_info.method == "lora" and lm.model.peft_info.base_sha256 == info.base_sha256
    assert lm.labels == ("c0", "c1", "c2")
    base = create_model(str(base_file))
    load_adapter(base, run / "adapter.safetensors")
    result = export(run, "safetensors", merge=True)
    merged_file = run / "model.merged.safetensors"
    assert result["path"] == str(merged_file) and result["ok"] and result["merged"] == "lora"
    assert result["merge_max_abs_diff"] <= 1e-5  # folded: only float rounding may differ
    base_keys = set(create_model(str(base_file)).state_dict())
    assert set(load_file(merged_file)) == base_keys
    merged = create_model(str(merged_file)).eval()
    assert getattr(merged, "peft_info", None) is None
    with torch.no_grad():
        assert torch.equal(lm.model(_x()), expected)
        assert torch.equal(base.eval()(_x()), expected)
        assert torch.allclose(merged(_x()), expected, atol=1e-5)
        # inside the run directory the merged file is still plain weights, not the run's PEFT model
        again = load_model(merged_file, device="cpu").model
        assert getattr(again, "peft_info", None) is None
        assert torch.allclose(again(_x()), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="pass --merge"):
        export(run, "safetensors", tmp_path / "unmerged.safetensors")
    with pytest.raises(ConfigError, match="nothing to merge"):
        export(base_file, "safetensors", tmp_path / "x.safetensors", merge=True)


@pytest.mark.peer("timm")
def test_merged_vit_tiny_loads_in_timm(tmp_path):
    run, model, _, _ = _peft_run(tmp_path, PeftConfig(method="lora"), name="vit_tiny_patch16_224", img_size=224,
                                 num_classes=4)
    r = vitkit("export", run, "--merge", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["format"] == "safetensors" and result["merged"] == "lora" and result["ok"]
    peer = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4).eval()
    peer.load_state_dict(load_file(result["path"]), strict=True)
    x = _x(224, 2)
    with torch.no_grad():
        assert torch.allclose(peer(x), model(x), atol=1e-4)


@pytest.mark.parametrize("method", ["bitfit", "vpt_deep", "adaptformer"])
def test_runs_of_other_methods_load_and_merge_or_refuse(tmp_path, method):
    run, model, _, _ = _peft_run(tmp_path, PeftConfig(method=method, vpt_prompts=3, adapter_width=8))
    lm = load_model(run, device="cpu")
    with torch.no_grad():
        assert torch.equal(lm.model(_x()), model(_x()))
    if method == "bitfit":  # trains base tensors in place: the merged file is the run's weights
        result = export(run, "safetensors", merge=True)
        assert result["ok"] and result["merge_max_abs_diff"] == 0.0
        assert set(load_file(result["path"])) == set(load_file(run / "model.safetensors"))
        return
    with pytest.raises(ConfigError, match=f"{method} cannot be merged"):
        export(run, "safetensors", merge=True)
    with pytest.raises(ConfigError, match="onnx or pt2"):
        export(run, "safetensors")


def test_merge_peft_leaves_a_plain_model():
    torch.manual_seed(0)
    model = create_model("test_vit", num_classes=3)
    base_keys = set(model.state_dict())
    apply_peft(model, PeftConfig(method="lora", lora_targets=["qkv", "proj", "fc1", "fc2"]))
    _train_like(model)
    with torch.no_grad():
        before = model(_x())
        merge_peft(model)
        assert torch.allclose(model.eval()(_x()), before, atol=1e-5)
    assert set(model.state_dict()) == base_keys and all(p.requires_grad for p in model.parameters())
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith(("qkv", "fc1")))
    with pytest.raises(ConfigError, match="no parameter-efficient fine-tuning applied"):
        merge_peft(model)
