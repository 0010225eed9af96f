"""PEFT core: trainable-parameter counts against hand counts, LoRA's math and merge, frozen gradients,
BatchNorm statistics, applicability errors and the base's identity."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vitkit import create_model
from vitkit.errors import ConfigError
from vitkit.peft import (
    LoRALinear,
    PeftConfig,
    apply_peft,
    merge_lora,
    state_sha256,
    supported_methods,
)


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


_BASES: dict[str, nn.Module] = {}


def _peft(name: str, method: str, **kw):
    if name not in _BASES:  # building a 224 px model once is most of these tests' time
        _BASES[name] = create_model(name, num_classes=10)
    model = copy.deepcopy(_BASES[name])
    info = apply_peft(model, PeftConfig(method=method, **kw))
    return model, info


# ---------------------------------------------------------------------- hand counts, ViT-Ti
D, DEPTH, MLP, CLASSES = 192, 12, 768, 10
VIT_TI_HEAD = D * CLASSES + CLASSES
# Parameters of one ViT-Ti block: qkv, proj, fc1, fc2 (weights + biases), two LayerNorms (weight + bias).
VIT_TI_BLOCK = (D * 3 * D + 3 * D) + (D * D + D) + (D * MLP + MLP) + (MLP * D + D) + 2 * (2 * D)
# Patch embedding (conv 16x16x3 -> D, with bias), class token, 14*14+1 positions, blocks, final norm.
VIT_TI_BASE = (16 * 16 * 3 * D + D) + D + 197 * D + DEPTH * VIT_TI_BLOCK + 2 * D


def test_vit_tiny_hand_counts():
    assert VIT_TI_BASE == 5_524_416  # timm's 5,717,416 for 1000 classes minus its 193,000-parameter head
    model, info = _peft("vit_tiny_patch16_224", "lora", lora_rank=8)
    assert info.n_method == 73_728 == DEPTH * 8 * (D + 3 * D)
    assert info.n_head == VIT_TI_HEAD and info.n_base == VIT_TI_BASE
    assert info.pct == pytest.approx(100 * 73_728 / VIT_TI_BASE)
    assert info.summary() == f"lora: 73,728 trainable ({100 * 73_728 / VIT_TI_BASE:.2f}% of 5.5M) + head 1,930"
    assert _trainable(model) == set(info.params) | set(info.head)
    assert set(info.head) == {"head.weight", "head.bias"}

    # BitFit: per block the biases of qkv, proj, fc1, fc2 and both norms; then patch embed and final norm.
    _, info = _peft("vit_tiny_patch16_224", "bitfit")
    assert info.n_method == DEPTH * (3 * D + D + MLP + D + D + D) + D + D == 25_728
    assert info.n_head == VIT_TI_HEAD and "head.bias" not in info.params

    model, info = _peft("vit_tiny_patch16_224", "partial", partial_k=1)
    assert info.n_method == VIT_TI_BLOCK + 2 * D == 445_248
    assert all(n.startswith(("blocks.11.", "norm.")) for n in info.params)
    assert _trainable(model) == set(info.params) | set(info.head)

    model, info = _peft("vit_tiny_patch16_224", "linear")
    assert info.n_method == 0 and info.params == [] and info.n_head == VIT_TI_HEAD
    assert _trainable(model) == {"head.weight", "head.bias"}


# ---------------------------------------------------------------------- hand counts, Swin-T
SWIN_DIMS, SWIN_DEPTHS = (96, 192, 384, 768), (2, 2, 6, 2)


def test_swin_tiny_hand_counts():
    _, info = _peft("swin_tiny_patch4_window7_224", "lora", lora_rank=8)
    # qkv is (d -> 3d) in every block of every stage: r * (d + 3d) each.
    assert info.n_method == sum(n * 8 * (d + 3 * d) for d, n in zip(SWIN_DIMS, SWIN_DEPTHS)) == 141_312
    assert info.n_head == 768 * CLASSES + CLASSES

    _, info = _peft("swin_tiny_patch4_window7_224", "bitfit")
    # Per block: qkv 3d, proj d, fc1 4d, fc2 d, norm1 d, norm2 d (the relative position table is no bias).
    blocks = sum(n * 11 * d for d, n in zip(SWIN_DIMS, SWIN_DEPTHS))
    # Patch merging before stages 2-4: LayerNorm over 4 * d_in (its reduction has no bias).
    merging = sum(4 * d for d in SWIN_DIMS[:3])
    # Patch embed: conv bias + its LayerNorm's bias; the final norm.
    assert info.n_method == blocks + merging + 2 * 96 + 768 == 52_224
    assert not any("relative_position_bias_table" in n for n in info.params)

    # partial-1: the last block of the last stage (d = 768, 24 heads, 7x7 windows) and the final norm.
    d = 768
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * (2 * d) + 13 * 13 * 24
    model, info = _peft("swin_tiny_patch4_window7_224", "partial", partial_k=1)
    assert info.n_method == block + 2 * d == 7_093_464
    assert all(n.startswith(("layers.3.blocks.1.", "norm.")) for n in info.params)
    assert _trainable(model) == set(info.params) | set(info.head)


# ---------------------------------------------------------------------- LoRA
def _tiny_vit(seed: int = 0, name: str = "test_vit") -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=5)


def test_lora_linear_matches_the_formula():
    torch.manual_seed(0)
    lin = nn.Linear(12, 20)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    layer = LoRALinear.convert(lin, r=4, alpha=6.0)
    assert layer is lin and layer.weight is lin.weight
    assert layer.lora_A.shape == (4, 12) and layer.lora_B.shape == (20, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_A.abs().max() <= 1 / 12 ** 0.5  # kaiming(a=sqrt 5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 7, 12)
    # h = W x + b + (alpha / r) B A x  (Hu et al. 2021, eq. 3)
    ref = x @ w.T + b + (6.0 / 4) * (x @ layer.lora_A.detach().T @ layer.lora_B.detach().T)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_lora_with_zero_b_equals_the_base_exactly():
    base = _tiny_vit().eval()
    model = copy.deepcopy(base)
    apply_peft(model, PeftConfig(method="lora", lora_targets=["qkv", "proj", "fc1", "fc2"]))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), base(x))


def test_frozen_params_get_no_grad():
    model = _tiny_vit()
    info = apply_peft(model, PeftConfig(method="lora"))
    with torch.no_grad():
        for n in info.params:
            if n.endswith("lora_B"):
                model.get_parameter(n).normal_()  # else A's gradient is zero (B = 0)
    model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    trainable = set(info.params) | set(info.head)
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_merge_equals_unmerged_and_restores_the_base_keys():
    base = _tiny_vit()
    model = copy.deepcopy(base)
    info = apply_peft(model, PeftConfig(method="lora", lora_rank=4, lora_alpha=16.0, lora_targets=["qkv", "fc2"]))
    with torch.no_grad():
        for n in info.params:
            model.get_parameter(n).normal_(std=0.5)
    qkv = model.blocks[0].attn.qkv
    expected = qkv.weight.detach() + 4.0 * qkv.lora_B.detach() @ qkv.lora_A.detach()  # W + (alpha/r) B A
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.eval()(x)
        merged = merge_lora(model)
        after = merged(x)
    assert (before - base.eval()(x)).abs().max() > 1e-2  # the update does change the outputs
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.blocks[0].attn.qkv.weight, expected)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert type(merged.blocks[0].attn.qkv) is nn.Linear
    assert list(merged.state_dict()) == list(base.state_dict())
    fresh = create_model("test_vit", num_classes=5).eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), before, atol=1e-5, rtol=1e-5)


def test_lora_targets_by_name_and_regex():
    model = _tiny_vit()
    info = apply_peft(model, PeftConfig(method="lora", lora_targets=[r"blocks\.1\.attn\.(qkv|proj)"]))
    assert info.params == ["blocks.1.attn.qkv.lora_A", "blocks.1.attn.qkv.lora_B",
                           "blocks.1.attn.proj.lora_A", "blocks.1.attn.proj.lora_B"]
    model = _tiny_vit()
    info = apply_peft(model, PeftConfig(method="lora", lora_targets=["fc1"]))
    assert {n.rsplit(".", 1)[0] for n in info.params} == {"blocks.0.mlp.fc1", "blocks.1.mlp.fc1"}
    with pytest.raises(ConfigError, match="no Linear layer matches .*named .*fc1, fc2, head, proj, qkv"):
        apply_peft(_tiny_vit(), PeftConfig(method="lora", lora_targets=["to_q"]))


def test_lora_skips_a_linear_whose_weight_is_read_directly():
    # SwinV2's cosine attention calls F.linear(x, self.qkv.weight, bias): LoRA there would do nothing.
    model = create_model("test_swinv2", num_classes=5)
    assert "lora" not in supported_methods(model)
    with pytest.raises(ConfigError, match="does not apply.*linear, bitfit, .*partial"):
        apply_peft(model, PeftConfig(method="lora"))
    info = apply_peft(model, PeftConfig(method="lora", lora_targets=["proj"]))
    assert info.n_method > 0


# ---------------------------------------------------------------------- applicability and config
def test_a_method_that_does_not_apply_names_those_that_do():
    with pytest.raises(ConfigError) as e:
        apply_peft(create_model("test_swin", num_classes=5), PeftConfig(method="vpt_deep"))
    msg = str(e.value)
    assert "test_swin" in msg and "vpt_deep" in msg and "plain token sequence" in msg
    named = msg.rpartition("Methods that apply to it: ")[2].split(", ")
    assert {"linear", "bitfit", "lora", "partial"} <= set(named) and not any(m.startswith("vpt") for m in named)
    with pytest.raises(ConfigError, match="Methods that apply to it: linear, bitfit$"):
        apply_peft(create_model("test_resnet", num_classes=5), PeftConfig(method="lora"))
    assert supported_methods(create_model("test_resnet", num_classes=5)) == ["linear", "bitfit"]
    assert {"linear", "bitfit", "lora", "partial"} <= set(supported_methods(_tiny_vit()))


def test_config_errors():
    for bad, needle in [
        (dict(method="prefix"), "peft.method must be one of linear, bitfit, lora"),
        (dict(method="lora", lora_rank=0), "peft.lora_rank"),
        (dict(method="lora", lora_dropout=1.0), "peft.lora_dropout"),
        (dict(method="lora", lora_targets=[]), "peft.lora_targets"),
        (dict(method="lora", lora_targets=["blocks.(qkv"]), "regular expression"),
        (dict(method="partial", norm_stats="update"), "peft.norm_stats"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            apply_peft(_tiny_vit(), PeftConfig(**bad))
    with pytest.raises(ConfigError, match="partial_k=3 but .* has 2 blocks"):
        apply_peft(_tiny_vit(), PeftConfig(method="partial", partial_k=3))
    with pytest.raises(ConfigError, match="needs a method"):
        apply_peft(_tiny_vit(), PeftConfig(method="none"))
    model = _tiny_vit()
    apply_peft(model, PeftConfig(method="bitfit"))
    with pytest.raises(ConfigError, match="already has peft.method=bitfit"):
        apply_peft(model, PeftConfig(method="lora"))


# ---------------------------------------------------------------------- BatchNorm and the base's identity
def test_batchnorm_statistics_frozen_or_updated():
    x = torch.randn(4, 3, 32, 32) * 3 + 1
    models = {}
    for norm_stats, changes in (("freeze", False), ("save", True)):
        model = models[norm_stats] = _tiny_vit(name="test_vit_convstem")
        apply_peft(model, PeftConfig(method="lora", norm_stats=norm_stats))
        bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        before = bn.running_mean.clone()
        model.train()(x)
        assert (not torch.equal(bn.running_mean, before)) == changes, norm_stats
        assert not bn.weight.requires_grad
    # frozen: the forward in train mode uses the running statistics, as eval does
    frozen = models["freeze"]
    with torch.no_grad():
        torch.testing.assert_close(frozen.train()(x), frozen.eval()(x))
        saved = models["save"]
        assert (saved.train()(x) - saved.eval()(x)).abs().max() > 1e-3


def test_state_sha256_identifies_the_base_without_its_head(tmp_path):
    from vitkit import load_weights, save_weights

    model = _tiny_vit(seed=0)
    sha = state_sha256(model, exclude=["head"])
    other_head = _tiny_vit(seed=0)
    other_head.reset_classifier(7)
    assert state_sha256(other_head, exclude=["head"]) == sha
    assert state_sha256(model) != sha  # the head counts unless excluded
    save_weights(model, tmp_path / "w.safetensors")
    reloaded = create_model("test_vit", num_classes=5)
    load_weights(reloaded, tmp_path / "w.safetensors")
    assert state_sha256(reloaded, exclude=["head"]) == sha
    assert state_sha256(reloaded.state_dict(), exclude=["head"]) == sha
    assert state_sha256(_tiny_vit(seed=1), exclude=["head"]) != sha
    info = apply_peft(model, PeftConfig(method="lora"))
    assert info.base_sha256 == sha and model.peft_info is info and model.peft_config.method == "lora"


def test_a_run_config_section_applies_and_is_saved_as_plain_data():
    import dataclasses
    import json

    from omegaconf import OmegaConf

    section = OmegaConf.merge(OmegaConf.structured(PeftConfig), OmegaConf.from_dotlist(["method=lora", "lora_targets=[qkv,fc2]"]))
    model = _tiny_vit()
    info = apply_peft(model, section)
    assert info.n_method == 2 * 8 * (64 + 3 * 64) + 2 * 8 * (256 + 64)  # qkv 64->192 and fc2 256->64 in 2 blocks
    assert json.loads(json.dumps(dataclasses.asdict(model.peft_config)))["lora_targets"] == ["qkv", "fc2"]
    assert not OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PeftConfig), {"method": "none"})).active
