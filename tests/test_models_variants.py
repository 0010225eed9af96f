"""Family-specific behaviour of ResNet, ConvNeXt, CaiT, ConViT and MLP-Mixer (the generic registry
tests in test_models.py cover their ``test_*`` variants)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.cli.main import main
from vitkit.layers import GlobalResponseNorm
from vitkit.models.cait import TalkingHeadAttention
from vitkit.models.convit import GPSA, relative_offsets
from vitkit.models.info import model_info


def test_families_are_listed_by_the_cli(capsys):
    assert main(["models", "cait*", "--no-flops"]) == 0
    out = capsys.readouterr().out
    assert "cait_xxs24_224" in out and "cait_s24_224" in out
    for pattern, expect in [
        ("convit*", ["convit_tiny", "convit_small", "convit_base"]),
        ("mixer*", ["mixer_s16_224", "mixer_b16_224"]),
        ("convnext*", ["convnext_atto", "convnext_base", "convnextv2_atto"]),
        ("resnet*", ["resnet18", "resnet50"]),
    ]:
        assert set(expect) <= set(vitkit.list_models(pattern))


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_cait", "test_mixer"])
def test_info_asks_the_model(name, capsys):
    assert main(["info", name, "--res", "32"]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "GFLOPs" in out
    info = model_info(name, resolutions=(32, 64))
    assert info["params"] == sum(p.numel() for p in vitkit.create_model(name).parameters())
    assert info["resolutions"][1]["gflops"] > info["resolutions"][0]["gflops"] > 0


# Parameter counts at 224 px and 1000 classes, as published with each paper's tables.
@pytest.mark.parametrize("name,params", [
    ("resnet18", 11_689_512),
    ("resnet50", 25_557_032),
    ("convnext_tiny", 28_589_128),
    ("mixer_b16_224", 59_880_472),
])
def test_paper_param_counts(name, params):
    with torch.device("meta"):
        m = vitkit.create_model(name)
    assert sum(p.numel() for p in m.parameters()) == params


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "convnextv2_atto", "cait_xxs24_224", "convit_tiny"])
def test_real_variants_take_other_input_sizes(name):
    m = vitkit.create_model(name, img_size=96, num_classes=5).eval()
    assert m.card.input_size == (3, 96, 96)
    with torch.no_grad():
        assert m(torch.randn(1, 3, 96, 96)).shape == (1, 5)
        assert m(torch.randn(1, 3, 64, 128)).shape == (1, 5)


def test_mixer_needs_its_build_size():
    m = vitkit.create_model("mixer_s16_224", img_size=64).eval()
    with pytest.raises(ValueError, match=r"input size 96x96 gives a 6x6 patch grid.*built for 64x64.*img_size=\(96, 96\)"):
        m(torch.randn(1, 3, 96, 96))
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("name", ["test_resnet", "test_convnextv2", "test_cait", "test_convit", "test_mixer"])
def test_save_and_rebuild_from_file(name, tmp_path):
    m = vitkit.create_model(name, num_classes=4).eval()
    path = vitkit.save_weights(m, tmp_path / "m.safetensors")
    again = vitkit.create_model(str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again(x), m(x), rtol=0, atol=0)


def test_feature_info_strides_match_the_maps():
    for name in ("test_resnet", "test_convnext"):
        m = vitkit.create_model(name).eval()
        maps = m.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
        assert len(maps) == len(m.feature_info)
        for f, info in zip(maps, m.feature_info):
            assert f.shape[1] == info["num_chs"] and f.shape[-1] == 64 // info["reduction"], (name, info)


def test_resnet_zero_init_last_makes_blocks_identity_residuals():
    m = vitkit.create_model("resnet18")
    assert all(blk.bn2.weight.abs().sum() == 0 for layer in (m.layer1, m.layer4) for blk in layer)
    assert vitkit.create_model("test_resnet").layer1[0].bn2.weight.abs().sum() > 0


def test_grn_by_hand():
    """x + w * x * n(x) + b with n = spatial L2 norm divided by its mean over channels."""
    x = torch.randn(2, 3, 4, 5)  # (B, H, W, C)
    grn = GlobalResponseNorm(5, eps=0.0)
    with torch.no_grad():
        grn.weight.copy_(torch.arange(5.0))
        grn.bias.fill_(0.5)
    gx = x.square().sum(dim=(1, 2)).sqrt()  # (B, C)
    n = gx / gx.mean(dim=1, keepdim=True)
    torch.testing.assert_close(grn(x), x + torch.arange(5.0) * x * n[:, None, None, :] + 0.5)
    # The channels-first layout computes the same thing.
    grn_cf = GlobalResponseNorm(5, eps=0.0, channels_last=False)
    grn_cf.load_state_dict(grn.state_dict())
    torch.testing.assert_close(grn_cf(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), grn(x))
    assert torch.equal(GlobalResponseNorm(5)(x), x)  # zero init: identity


def test_talking_heads_without_mixing_is_plain_attention():
    attn = TalkingHeadAttention(16, num_heads=4).eval()
    with torch.no_grad():
        for proj in (attn.proj_l, attn.proj_w):
            proj.weight.copy_(torch.eye(4))
            proj.bias.zero_()
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    expected = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x), expected, atol=1e-6, rtol=1e-5)


def test_cait_class_attention_leaves_patch_tokens_alone():
    m = vitkit.create_model("test_cait").eval()
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_features(x)
    (last,) = m.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(feats[:, 1:], last)
    # The class token reads the patches: changing one patch changes it.
    x2 = x.clone()
    x2[:, :, :8, :8] += 1
    assert not torch.allclose(m.forward_features(x2)[:, 0], feats[:, 0])


def test_relative_offsets_by_hand():
    rel = relative_offsets((2, 3))[0]  # patches row-major: (r, c) = (0,0) (0,1) (0,2) (1,0) (1,1) (1,2)
    assert rel.shape == (6, 6, 3)
    assert rel[0, 5].tolist() == [2.0, 1.0, 5.0]  # from (0,0) to (1,2): dx=2, dy=1
    assert rel[4, 0].tolist() == [-1.0, -1.0, 2.0]
    assert torch.equal(rel[..., 2], rel[..., 0] ** 2 + rel[..., 1] ** 2)


def test_gpsa_local_init_is_a_convolution():
    """With a strong locality and the gate shut to content, head h attends to its own kernel offset."""
    attn = GPSA(36, num_heads=9, locality_strength=10.0)  # 3x3 kernel of offsets
    attn.local_init()
    assert torch.equal(attn.v.weight, torch.eye(36))
    with torch.no_grad():
        attn.gating_param.fill_(50.0)  # sigmoid ~ 1: positional attention only
    grid = (5, 5)
    weights = attn.attention(torch.randn(1, 25, 36), relative_offsets(grid))  # (1, heads, N, N)
    center = 2 * 5 + 2
    offsets = set()
    for h in range(9):
        j = weights[0, h, center].argmax().item()
        assert weights[0, h, center, j] > 0.99
        offsets.add((j // 5 - 2, j % 5 - 2))
    assert offsets == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}


def test_gpsa_gate_mixes_content_and_position():
    attn = GPSA(16, num_heads=4)
    x, rel = torch.randn(2, 9, 16), relative_offsets((3, 3))
    with torch.no_grad():
        attn.gating_param.fill_(-50.0)  # gate shut: content attention only
    q, k = attn.qk(x).reshape(2, 9, 2, 4, 4).permute(2, 0, 3, 1, 4)
    content = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
    torch.testing.assert_close(attn.attention(x, rel), content)
    with torch.no_grad():
        attn.gating_param.zero_()  # half and half
    position = attn.pos_proj(rel).permute(0, 3, 1, 2).softmax(-1)
    torch.testing.assert_close(attn.attention(x, rel), 0.5 * content + 0.5 * position)


def test_convit_rejects_no_plain_block():
    with pytest.raises(ValueError, match="local_up_to_layer 2 must be in"):
        vitkit.create_model("test_convit", local_up_to_layer=2)


def test_reset_classifier_and_weight_decay_hooks():
    for name in ("test_resnet", "test_convnext", "test_cait", "test_convit", "test_mixer"):
        m = vitkit.create_model(name, num_classes=10).eval()
        m.reset_classifier(3)
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 3) and m.num_classes == 3
        m.reset_classifier(0)
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, m.num_features)
        names = dict(m.named_parameters())
        assert m.no_weight_decay() <= set(names)
        gm = m.group_matcher()
        assert all(isinstance(k, str) for k in gm), name


def test_conv_stem_vit_option():
    """Early convolutions (Xiao et al., 2021) replace the patchify conv and keep the token grid."""
    x = torch.randn(2, 3, 32, 48)
    plain = vitkit.create_model("test_vit").eval()
    conv = vitkit.create_model("test_vit", conv_stem=True).eval()
    convs = [m for m in conv.patch_embed.stem if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and all(c.kernel_size == (3, 3) for c in convs)  # patch 8 = three halvings
    assert conv.patch_embed.proj.kernel_size == (1, 1)
    assert conv.forward_features(x).shape == plain.forward_features(x).shape == (2, 1 + 4 * 6, 64)
