"""Dense models: every head on tiny backbones at sizes that are not multiples of the stride,
gradients, rebuilding from model_args, depth, and a reference computation per head."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitkit
from vitkit.dense import DenseModel, create_dense_model, list_heads
from vitkit.dense.heads.setr import evenly_spaced_layers
from vitkit.engine.optim import layer_ids
from vitkit.errors import ConfigError

H, W = 45, 60  # 180x240 scaled down: a multiple of neither 8, 16 nor 32
SMALL = {"upernet": {"channels": 16}, "setr_pup": {"channels": 16}, "setr_naive": {"channels": 16},
         "setr_mla": {"neck_channels": 16, "mla_channels": 8}}
VIT = ("test_vit", {"depth": 4})  # four distinct layers for SETR-MLA
BACKBONES = {"vit": VIT, "swin": ("test_swin", {}), "convnext": ("test_convnext", {}), "pvt": ("test_pvt_v2", {})}
# SETR-MLA aggregates layers of one stride: plain ViTs only (a clear error elsewhere, tested below).
CASES = [(b, h) for h in ("linear", "setr_naive", "setr_pup", "setr_mla", "segmenter", "upernet")
         for b in BACKBONES if h != "setr_mla" or b == "vit"]


def build(backbone: str, head: str, task: str = "segment", num_classes: int | None = 5, **kw) -> DenseModel:
    name, args = BACKBONES[backbone]
    torch.manual_seed(0)
    return create_dense_model(name, head, num_classes=num_classes if task == "segment" else None, task=task,
                              backbone_args=dict(args), head_args=dict(SMALL.get(head, {})), **kw)


def _unread(backbone: str, head: str) -> list[str]:
    """Backbone parameters a dense head cannot read: ConvNeXt's pooled-classifier norm sits after
    global pooling, and SETR reads the last layer before the final norm (it has its own)."""
    if backbone == "convnext":
        return ["backbone.head.norm.weight", "backbone.head.norm.bias"]
    if head.startswith("setr") and backbone in ("vit", "swin"):
        return ["backbone.norm.weight", "backbone.norm.bias"]
    return []


def test_builtin_heads_are_registered():
    assert set(list_heads("segment")) >= {"linear", "setr_naive", "setr_pup", "setr_mla", "segmenter", "upernet"}
    assert "segmenter" not in list_heads("depth")  # a LayerNorm over one "class" is constant


@pytest.mark.parametrize("backbone,head", CASES)
def test_output_at_input_size_and_every_parameter_learns(backbone, head):
    m = build(backbone, head)
    x = torch.randn(2, 3, H, W)
    out = m(x)
    assert out.shape == (2, 5, H, W)
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"parameters without a gradient: {missing}"
    # What the head never reads is frozen (optimizers and DDP skip it) but stays in the state dict.
    assert m.frozen_unused == _unread(backbone, head)
    assert all(not p.requires_grad and p.grad is None for n, p in m.named_parameters() if n in m.frozen_unused)
    assert set(m.frozen_unused) <= set(m.state_dict())


@pytest.mark.parametrize("head", list_heads())
def test_every_registered_head_builds_through_create_dense_model(head):
    for task in ("segment", "depth") if head in list_heads("depth") else ("segment",):
        m = build("vit", head, task=task)
        out = m(torch.randn(2, 3, H, W))
        assert out.shape == (2, 5 if task == "segment" else 1, H, W)
        args = json.loads(json.dumps(m.model_args))
        assert list(create_dense_model(**args).state_dict()) == list(m.state_dict())


@pytest.mark.parametrize("head", ["linear", "setr_mla", "segmenter", "upernet"])
def test_model_args_rebuild_the_same_model(head):
    m = build("vit", head)
    args = json.loads(json.dumps(m.model_args))  # what save_weights stores
    assert args["backbone"] == "test_vit" and args["backbone_args"] == {"depth": 4} and args["head"] == head
    m2 = create_dense_model(**args)
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert list(sd) == list(sd2)
    assert all(sd[k].shape == sd2[k].shape for k in sd)
    assert (m2.task, m2.num_classes, m2.stride) == (m.task, m.num_classes, m.stride)
    assert m2.load_state_dict(sd) is not None


def test_model_args_of_a_built_backbone_and_of_a_module_without_a_name():
    bb = vitkit.create_model("test_swin", num_classes=10, img_size=48).eval()
    m = create_dense_model(bb, "upernet", num_classes=3, head_args={"channels": 8})
    assert not m.backbone.training and m.head.training  # building leaves each part's mode as it was
    assert m.backbone.num_classes == 0  # the classifier is dropped
    args = m.model_args
    assert args["backbone"] == "test_swin" and args["img_size"] == 48 and args["backbone_args"] == {}
    assert list(create_dense_model(**args).state_dict()) == list(m.state_dict())
    assert m.card.name == "test_swin" and m.card.num_classes == 3

    plain = create_dense_model(_ConvBackbone(), "linear", num_classes=2)
    assert plain.model_args["backbone"] is None
    with pytest.raises(ConfigError, match="unnamed backbone"):
        create_dense_model(**plain.model_args)


@pytest.mark.parametrize("head", ["linear", "setr_pup", "upernet"])
def test_depth_is_one_non_negative_channel(head):
    m = build("vit", head, task="depth").eval()
    with torch.no_grad():
        m.head.conv_seg.bias.fill_(-0.05) if hasattr(m.head, "conv_seg") else m.head.head.bias.fill_(-0.05)
        out = m(torch.randn(2, 3, H, W))
    assert out.shape == (2, 1, H, W) and m.num_classes == 0
    assert (out >= 0).all() and (out == 0).any()  # a negative raw output is clipped, not passed on


def test_stride_covers_every_map_the_head_reads():
    assert build("vit", "linear").stride == 8  # the patch size
    assert build("vit", "upernet").stride == 16  # simple pyramid down to 2x the patch
    assert build("swin", "linear").stride == 16  # test_swin's deepest stage (patch 2, 4 stages)
    assert build("convnext", "upernet").stride == 32  # 4-level pyramid from 2 stages: 4, 8, 16, 32
    m = create_dense_model("test_vit", "upernet", num_classes=2, img_size=28, backbone_args={"patch_size": 14},
                           head_args={"channels": 8})
    assert m.stride == 28  # levels at 3.5, 7, 14, 28 px tile exactly at multiples of 28
    assert m.eval()(torch.randn(1, 3, 30, 33)).shape == (1, 2, 30, 33)

    class OwnMaps(nn.Module):  # a head with maps of its own at 24 px
        input_multiple = 24

        def __init__(self):
            super().__init__()
            self.fc = nn.Conv2d(64, 2, 1)

        def forward(self, backbone, x):
            assert x.shape[-2] % 24 == 0 and x.shape[-1] % 24 == 0
            return self.fc(backbone.forward_intermediates(x, indices=1, intermediates_only=True)[0])

    own = DenseModel(vitkit.create_model("test_vit", num_classes=0), OwnMaps(), num_classes=2)
    assert own.stride == 24  # lcm(patch 8, 24)
    assert own(torch.randn(1, 3, H, W)).shape == (1, 2, H, W)


@pytest.mark.parametrize("backbone", ["vit", "swin"])
def test_padding_is_zeros_bottom_right_and_cropped(backbone):
    m = build(backbone, "upernet").eval()
    x = torch.randn(1, 3, H, W)
    s = m.stride
    padded = torch.zeros(1, 3, -(-H // s) * s, -(-W // s) * s)
    padded[..., :H, :W] = x
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(padded)[..., :H, :W])


# ---------------------------------------------------------------------- reference checks per head
def test_linear_is_a_per_patch_matmul_upsampled():
    m = build("vit", "linear").eval()
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        xp = F.pad(x, (0, 4, 0, 3))  # 48 x 64: a 6 x 8 grid of 8 px patches
        tokens = m.backbone.forward_features(xp)[:, m.backbone.num_prefix_tokens:]  # (B, 48, D), normalised
        w, b = m.head.head.weight, m.head.head.bias
        logits = torch.einsum("bnd,cd->bcn", tokens, w) + b[None, :, None]
        ref = F.interpolate(logits.reshape(2, 5, 6, 8), size=(48, 64), mode="bilinear", align_corners=False)
        torch.testing.assert_close(m(x), ref[..., :H, :W], rtol=1e-5, atol=1e-5)


def test_segmenter_masks_are_cosine_products_normalised_over_classes():
    m = build("vit", "segmenter").eval()
    head, bb = m.head, m.backbone
    assert len(head.blocks) == 2 and head.cls_emb.shape == (1, 5, 64) and head.blocks[0].attn.num_heads == 1
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        feats = bb.forward_features(x)[:, bb.num_prefix_tokens:]  # (B, 48, 64)
        seq = torch.cat([head.proj_dec(feats), head.cls_emb.expand(2, -1, -1)], 1)
        for blk in head.blocks:
            seq = blk(seq)
        seq = F.layer_norm(seq, (64,), head.decoder_norm.weight, head.decoder_norm.bias)
        p = seq[:, :48] @ head.proj_patch
        c = seq[:, 48:] @ head.proj_classes
        cos = (p / p.norm(dim=-1, keepdim=True)) @ (c / c.norm(dim=-1, keepdim=True)).transpose(1, 2)
        assert cos.abs().max() <= 1 + 1e-5
        ref = (cos - cos.mean(-1, keepdim=True)) / torch.sqrt(cos.var(-1, unbiased=False, keepdim=True) + 1e-5)
        ref = ref.transpose(1, 2).reshape(2, 5, 6, 8)
        torch.testing.assert_close(head(bb, x), ref, rtol=1e-4, atol=1e-4)
    assert "head.cls_emb" in m.no_weight_decay() and "backbone.pos_embed" in m.no_weight_decay()


def test_setr_pup_norms_the_last_raw_layer_and_upsamples_16x():
    m = build("vit", "setr_pup").eval()
    seen = {}
    m.head.up_convs[0].register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0]))
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        raw = m.backbone.forward_intermediates(x, indices=[-1], norm=False, intermediates_only=True)[0]  # (1, D, 6, 8)
        out = m.head(m.backbone, x)
    mu, var = raw.mean(1, keepdim=True), raw.var(1, unbiased=False, keepdim=True)
    ln = m.head.norm
    ref = (raw - mu) / torch.sqrt(var + 1e-6) * ln.weight[:, None, None] + ln.bias[:, None, None]
    torch.testing.assert_close(seen["inp"], ref, rtol=1e-5, atol=1e-5)
    assert len(m.head.up_convs) == 4 and out.shape == (1, 5, 6 * 16, 8 * 16)
    assert m.head.up_convs[0][0].conv.kernel_size == (3, 3)


def test_setr_mla_layers_and_top_down_aggregation():
    assert evenly_spaced_layers(24) == [5, 11, 17, 23] and evenly_spaced_layers(12) == [2, 5, 8, 11]
    m = build("vit", "setr_mla").eval()
    assert m.head.layers == [0, 1, 2, 3]
    proj, agg = [], []
    for conv in m.head.channel_proj:
        conv.register_forward_hook(lambda mod, inp, out: proj.append(out))
    for conv in m.head.feat_extract:
        conv.register_forward_hook(lambda mod, inp, out: agg.append(inp[0]))
    with torch.no_grad():
        out = m.head(m.backbone, torch.randn(1, 3, 48, 64))
    # Stream k (deepest first) sees its projection plus every deeper one.
    for k in range(4):
        torch.testing.assert_close(agg[k], sum(proj[3 - j] for j in range(k + 1)))
    assert out.shape == (1, 5, 6 * 4, 8 * 4) and m.head.conv_seg.in_channels == 4 * 8
    with pytest.raises(ConfigError, match="one stride"):
        build("swin", "setr_mla")


@pytest.mark.parametrize("backbone", ["swin", "vit", "convnext"])
def test_upernet_pools_the_top_level_and_fuses_at_stride_4(backbone):
    m = build(backbone, "upernet").eval()
    pooled, fused = [], {}
    for stage in m.head.psp_modules:
        stage[0].register_forward_hook(lambda mod, inp, out: pooled.append(out.shape[-2:]))
    m.head.fpn_bottleneck.register_forward_hook(lambda mod, inp, out: fused.update(inp=inp[0].shape, out=out.shape))
    s = m.stride
    with torch.no_grad():
        m(torch.randn(2, 3, H, W))
    hp, wp = -(-H // s) * s, -(-W // s) * s
    assert [tuple(p) for p in pooled] == [(1, 1), (2, 2), (3, 3), (6, 6)]
    levels = [f["reduction"] for f in m.backbone.pyramid_info()]
    # The standard 4, 8, 16, 32 on ConvNeXt; test_swin (patch 2) and test_vit's simple pyramid (patch 8) start at 2.
    assert levels == {"convnext": [4, 8, 16, 32], "swin": [2, 4, 8, 16], "vit": [2, 4, 8, 16]}[backbone]
    assert fused["inp"] == (2, 4 * 16, hp // levels[0], wp // levels[0])
    assert fused["out"] == (2, 16, hp // levels[0], wp // levels[0])


# ---------------------------------------------------------------------- optimizer hooks and errors
def test_layer_decay_groups_put_the_backbone_first_and_the_head_last():
    m = build("vit", "upernet")
    ids, n = layer_ids([name for name, _ in m.named_parameters()], m.group_matcher())
    assert ids["backbone.patch_embed.proj.weight"] == 0
    assert ids["backbone.blocks.0.attn.qkv.weight"] == 1 and ids["backbone.blocks.3.attn.qkv.weight"] == 4
    assert ids["backbone.norm.weight"] == 4  # the final norm joins the last block
    assert {i for k, i in ids.items() if k.startswith("head.")} == {n - 1} and n == 6
    assert not hasattr(create_dense_model(_ConvBackbone(), "linear", num_classes=2), "group_matcher")


def test_training_hooks_reach_the_backbone():
    m = build("vit", "linear")
    m.set_grad_checkpointing(True)
    assert m.backbone.grad_checkpointing
    assert m.block_modules() == list(m.backbone.blocks)
    assert float(m.aux_loss()) == 0.0


def test_bad_requests_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown dense head"):
        create_dense_model("test_vit", "fcn", num_classes=2)
    with pytest.raises(ConfigError, match="num_classes"):
        create_dense_model("test_vit", "linear")
    with pytest.raises(ConfigError, match="does not serve task 'depth'"):
        create_dense_model("test_vit", "segmenter", task="depth")
    with pytest.raises(ConfigError, match="accepts"):
        create_dense_model("test_vit", "upernet", num_classes=2, head_args={"chanels": 8})
    with pytest.raises(ConfigError, match="conv norm"):
        create_dense_model("test_vit", "upernet", num_classes=2, head_args={"norm": "ln"})
    with pytest.raises(ConfigError, match="dense task"):
        create_dense_model("test_vit", "linear", num_classes=2, task="detect")
    with pytest.raises(ConfigError, match="img_size"):
        create_dense_model("test_vit", "linear", num_classes=2, backbone_args={"img_size": 64})
    with pytest.raises(ConfigError, match="batch of 2"):
        build("vit", "upernet")(torch.randn(1, 3, 32, 32))
    m = create_dense_model("test_vit", "linear", num_classes=2)
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(3, 32, 32))


class _ConvBackbone(nn.Module):
    """A minimal backbone with only the dense API (no name, no group_matcher): two strided convs."""

    in_chans = 3
    num_classes = 0
    feature_info = [dict(num_chs=8, reduction=2, module="c1"), dict(num_chs=8, reduction=4, module="c2")]

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 2, 2)
        self.c2 = nn.Conv2d(8, 8, 2, 2)

    def forward_intermediates(self, x, indices=None, norm=False, intermediates_only=False, **kw):
        a = self.c1(x)
        b = self.c2(a)
        feats = [[a, b][i] for i in ([-1] if indices == 1 else indices)]
        return feats if intermediates_only else (b, feats)
