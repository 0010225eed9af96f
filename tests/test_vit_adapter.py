"""ViT-Adapter head: output shapes (padded to 32 px by DenseModel), the zero-gamma injector leaving
the ViT's tokens as they were, the injector against torch's own multi-head attention, the ConvFFN
keeping levels apart, UperNet as its decoder, gradients to every parameter, and on a ViTDet backbone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vitkit
from vitkit.dense import create_dense_model, head_entry
from vitkit.dense.heads.upernet import UperNetHead
from vitkit.dense.heads.vit_adapter import ConvFFN, Injector, ViTAdapterHead, quarter_groups
from vitkit.errors import ConfigError

SMALL = dict(conv_inplane=8, decoder_channels=16)  # a narrow conv stem and decoder keep the tests fast


def _vit(name="test_vit", **kw):
    torch.manual_seed(0)
    return vitkit.create_model(name, num_classes=0, img_size=64, patch_size=16, **{"depth": 4, **kw})


def _last_block_output(backbone, run):
    out = []
    hook = backbone.blocks[-1].register_forward_hook(lambda m, a, o: out.append(o.detach().clone()))
    try:
        run()
    finally:
        hook.remove()
    return out[-1]


def test_registered_for_segment_and_depth():
    assert head_entry("vit_adapter", "segment").cls is ViTAdapterHead
    assert head_entry("vit_adapter", "depth").cls is ViTAdapterHead


@pytest.mark.parametrize("name", ["test_vit", "test_vitdet"])
@pytest.mark.parametrize("decoder", ["upernet", "minimal"])
def test_output_shapes(name, decoder):
    b = _vit(name).eval()
    head = ViTAdapterHead(b, 5, decoder=decoder, **SMALL).eval()
    H, W = 64, 96
    x = torch.randn(2, 3, H, W)
    y = head(b, x)
    assert y.shape == (2, 5, H // 4, W // 4) and torch.isfinite(y).all()
    feats = head.features(b, x)
    assert [tuple(f.shape) for f in feats] == [(2, 64, H // s, W // s) for s in (4, 8, 16, 32)]
    assert [(p["num_chs"], p["reduction"]) for p in head.pyramid_info()] == [(64, s) for s in (4, 8, 16, 32)]
    with pytest.raises(ValueError, match="multiples of 32 px"):
        head(b, torch.randn(1, 3, 50, 70))


@pytest.mark.parametrize("name", ["test_vit", "test_vitdet"])
def test_dense_model_pads_to_the_adapter_multiple(name):
    m = create_dense_model(name, "vit_adapter", num_classes=3, img_size=64, backbone_args=dict(patch_size=16, depth=4),
                           head_args=SMALL).eval()
    assert m.stride == 32 == m.head.input_multiple
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        y = m(x)
        # What DenseModel does, spelt out: zero padding to 64x96, the head at stride 4, bilinear
        # upsampling to the padded size, the crop.
        padded = torch.nn.functional.pad(x, (0, 26, 0, 14))
        z = torch.nn.functional.interpolate(m.head(m.backbone, padded), size=(64, 96), mode="bilinear")[..., :50, :70]
    assert y.shape == (2, 3, 50, 70)
    torch.testing.assert_close(y, z, atol=1e-6, rtol=1e-6)


def test_upernet_decoder_is_upernet_on_the_adapter_maps():
    """The default decoder has UperNet's parameters (names and shapes of a UperNet head on a pyramid of
    the same channels) and gives what that UperNet head gives when the pyramid is the adapter's maps."""
    b = _vit().eval()
    head = ViTAdapterHead(b, 5, **SMALL).eval()
    assert isinstance(head.decoder, UperNetHead)
    plain = UperNetHead(b, 5, channels=16).eval()  # test_vit's simple pyramid: 64 channels at 4, 8, 16, 32
    assert {k: v.shape for k, v in head.decoder.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    with torch.no_grad():
        for p in head.decoder.parameters():
            p.normal_()
    plain.load_state_dict(head.decoder.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = head.features(b, x)

        class Pyramid(nn.Module):  # a backbone whose pyramid is the adapter's maps
            def forward_intermediates(self, x, **kw):
                return feats

        torch.testing.assert_close(head(b, x), plain(Pyramid(), x), atol=0, rtol=0)
        # and the fused maps reach the classifier through the pyramid pooling: the top level counts
        top = head.decoder.decode(feats[:3] + [feats[3] + 1.0])
    assert (top - head(b, x)).abs().max() > 1e-4


def test_decoder_batch_of_one():
    b = _vit().train()
    with pytest.raises(ConfigError, match="decoder_norm"):
        ViTAdapterHead(b, 3, **SMALL).train()(b, torch.randn(1, 3, 64, 64))
    # GroupNorm (32 groups of 2 channels here) normalises a single image's 1x1 pooled map.
    y = ViTAdapterHead(b, 3, decoder_norm="gn", **{**SMALL, "decoder_channels": 64}).train()(b, torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("name, kw, prefix", [
    ("test_vit", dict(class_token=False, global_pool="avg"), "drop"),
    ("test_vit", {}, "keep"),  # the class token runs through the blocks as in the plain ViT
    ("test_vitdet", {}, "drop"),
    ("test_vit_modern", {}, "keep"),  # RoPE and register tokens through the plain block calls
])
def test_zero_gamma_injector_leaves_the_vit_tokens_unchanged(name, kw, prefix):
    b = _vit(name, **kw).eval()
    head = ViTAdapterHead(b, 3, prefix_tokens=prefix, **SMALL).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        plain = _last_block_output(b, lambda: b.forward_features(x))
        adapted = _last_block_output(b, lambda: head(b, x))
        torch.testing.assert_close(adapted, plain, atol=0, rtol=0)
        for layer in head.interactions:
            layer.injector.gamma.fill_(0.5)
        changed = _last_block_output(b, lambda: head(b, x))
    assert (changed - plain).abs().max() > 1e-3  # the check above can fail: an active injector moves them


def test_injector_is_gamma_times_multihead_cross_attention():
    torch.manual_seed(0)
    inj = Injector(48, num_heads=6, init_values=0.0)
    with torch.no_grad():
        inj.gamma.normal_()
        for p in (inj.query_norm.weight, inj.feat_norm.bias):
            p.normal_()
    ref = nn.MultiheadAttention(48, 6, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([inj.attn.q.weight, inj.attn.kv.weight]))
        ref.in_proj_bias.copy_(torch.cat([inj.attn.q.bias, inj.attn.kv.bias]))
        ref.out_proj.weight.copy_(inj.attn.proj.weight)
        ref.out_proj.bias.copy_(inj.attn.proj.bias)
    q, feat = torch.randn(2, 12, 48), torch.randn(2, 21, 48)
    qn, fn = inj.query_norm(q), inj.feat_norm(feat)
    expect = q + inj.gamma * ref(qn, fn, fn, need_weights=False)[0]
    torch.testing.assert_close(inj(q, feat), expect, atol=1e-5, rtol=1e-5)
    assert torch.equal(Injector(48, 6)(q, feat), q)  # gamma 0 (the reference's init_values)


def test_conv_ffn_keeps_levels_apart():
    torch.manual_seed(0)
    ffn = ConvFFN(16, 8)
    shapes = [(4, 6), (2, 3), (1, 2)]
    x = torch.randn(1, 24 + 6 + 2, 16)
    y = ffn(x, shapes)
    x2 = x.clone()
    x2[:, 24:] += 1.0  # change the coarser levels only
    y2 = ffn(x2, shapes)
    torch.testing.assert_close(y2[:, :24], y[:, :24], atol=0, rtol=0)
    assert (y2[:, 24:30] - y[:, 24:30]).abs().max() > 1e-4
    # Inside a level the 3x3 depthwise conv mixes neighbours: token (0, 0) changes when (1, 1) does.
    x3 = x.clone()
    x3[:, 7] += 1.0  # (1, 1) of the 4x6 level
    assert (ffn(x3, shapes)[:, 0] - y[:, 0]).abs().max() > 1e-6


@pytest.mark.parametrize("name, prefix, decoder", [("test_vit", "keep", "upernet"), ("test_vitdet", "drop", "upernet"),
                                                   ("test_vit", "keep", "minimal")])
def test_gradient_reaches_every_parameter(name, prefix, decoder):
    b = _vit(name).train()
    head = ViTAdapterHead(b, 4, init_values=0.1, prefix_tokens=prefix, decoder=decoder, **SMALL).train()
    head(b, torch.randn(2, 3, 64, 64)).square().mean().backward()
    named = [(f"backbone.{n}", p) for n, p in b.named_parameters() if not n.startswith(("norm.", "fc_norm."))]
    for n, p in named + [(f"head.{n}", p) for n, p in head.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_zero_gamma_still_learns_gamma():
    b = _vit().train()
    head = ViTAdapterHead(b, 4, **SMALL).train()
    head(b, torch.randn(2, 3, 64, 64)).square().mean().backward()
    for layer in head.interactions:
        assert layer.injector.gamma.grad.abs().sum() > 0
        assert layer.injector.attn.q.weight.grad.abs().sum() == 0  # behind gamma = 0 at the first step


def test_reference_defaults():
    assert quarter_groups(12) == [(0, 2), (3, 5), (6, 8), (9, 11)]
    assert quarter_groups(24) == [(0, 5), (6, 11), (12, 17), (18, 23)]
    with torch.device("meta"):
        b = vitkit.create_model("vit_small_patch16_224", num_classes=0)
        head = ViTAdapterHead(b, 150)
    assert head.interaction_indexes == quarter_groups(12)
    inj, ex = head.interactions[0].injector, head.interactions[0].extractor
    assert inj.attn.num_heads == 6 and ex.ffn.fc1.out_features == 384 // 4
    assert head.interactions[0].extra_extractors is None and len(head.interactions[-1].extra_extractors) == 2
    assert head.spm.fc1.in_channels == 64 and head.input_multiple == 32
    assert head.no_weight_decay() <= dict(head.named_parameters()).keys()
    # The paper's decoder, UperNet at its own defaults: 512 channels, pooling scales 1, 2, 3, 6.
    assert isinstance(head.decoder, UperNetHead) and head.decoder.pool_scales == (1, 2, 3, 6)
    assert head.decoder.conv_seg.in_channels == 512 and head.decoder.lateral_convs[0].conv.in_channels == 384


def test_clear_errors():
    b = _vit()
    with pytest.raises(ConfigError, match="only 'cross'"):
        ViTAdapterHead(b, 3, attn="deformable")
    with pytest.raises(ConfigError, match="available: 'upernet'"):
        ViTAdapterHead(b, 3, decoder="fpn")
    with pytest.raises(ConfigError, match="decoder_channels"):
        ViTAdapterHead(b, 3, decoder_channels=0)
    with pytest.raises(ConfigError, match="plain ViT backbone"):
        ViTAdapterHead(vitkit.create_model("test_swin", num_classes=0), 3)
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        ViTAdapterHead(b, 3, num_heads=5)
    with pytest.raises(ConfigError, match="interaction_indexes"):
        ViTAdapterHead(b, 3, interaction_indexes=[[0, 1], [2, 9]])
    with pytest.raises(ConfigError, match="at least 4 ViT blocks"):
        ViTAdapterHead(_vit(depth=2), 3)
