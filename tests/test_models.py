import re

import pytest
import torch

import vitkit
from vitkit.layers import record_attention

TEST_MODELS = vitkit.list_models("test_*")


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", TEST_MODELS)
def test_forward_shape_finite(name):
    m = vitkit.create_model(name, num_classes=7).eval()
    y = m(torch.randn(3, 3, 32, 32))
    assert y.shape == (3, 7) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", TEST_MODELS)
def test_backward_reaches_every_parameter(name):
    m = vitkit.create_model(name, num_classes=5).train()
    out = m(torch.randn(4, 3, 32, 32))
    loss = sum(o.square().mean() for o in out) if isinstance(out, tuple) else out.square().mean()
    aux = m.aux_loss() if hasattr(m, "aux_loss") else 0.0  # MoE load balancing, ViT only
    (loss + aux).backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            if ".experts." in n:
                continue  # an expert that no token chose this step rightly gets a zero gradient
            assert p.grad.abs().sum() > 0, f"{n} got an all-zero gradient"


@pytest.mark.parametrize("name", TEST_MODELS)
def test_intermediates_agree_with_features(name):
    # Models with fixed-size weights (Mixer's token mixing) are built at the test size.
    fixed = getattr(vitkit.create_model(name), "fixed_input_size", False)
    m = vitkit.create_model(name, **({"img_size": (32, 48)} if fixed else {})).eval()
    x = torch.randn(2, 3, 32, 48)
    feats = m.forward_features(x)
    final, inter = m.forward_intermediates(x, indices=[0, -1], norm=True)
    torch.testing.assert_close(final, feats)
    # The last map's size follows its stated stride (ViT patch 8: 4x6; hierarchical models pad up).
    stride = m.feature_info[-1]["reduction"]
    h, w = -(-32 // stride), -(-48 // stride)
    assert len(inter) == 2 and inter[-1].shape == (2, m.num_features, h, w)
    # The last block's patch tokens, normalised and laid out as a map, are the features' patch tokens
    # (convolutional models: the features are that map).
    if feats.ndim == 4:
        patches = feats
    else:
        patches = feats[:, m.num_prefix_tokens:].reshape(2, h, w, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(inter[-1], patches)
    only = m.forward_intermediates(x, indices=1, intermediates_only=True, output_fmt="NLC")
    assert len(only) == 1 and only[0].shape == (2, h * w, m.num_features)


@pytest.mark.parametrize("name", TEST_MODELS)
@pytest.mark.parametrize("size", [(48, 48), (24, 40), (64, 32)])
def test_other_input_sizes(name, size):
    m = vitkit.create_model(name, num_classes=3).eval()
    if getattr(m, "fixed_input_size", False):
        with pytest.raises(ValueError, match=rf"input size {size[0]}x{size[1]}.*img_size=\({size[0]}, {size[1]}\)"):
            m(torch.randn(2, 3, *size))
        m = vitkit.create_model(name, num_classes=3, img_size=size).eval()
    y = m(torch.randn(2, 3, *size))
    assert y.shape == (2, 3) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", TEST_MODELS)
def test_grad_checkpointing_is_equivalent_and_recomputes(name):
    torch.manual_seed(0)
    m = vitkit.create_model(name, num_classes=4).eval()  # eval: no dropout randomness
    x = torch.randn(2, 3, 32, 32)
    calls = []
    hooks = [mod.register_forward_hook(lambda *_: calls.append(1)) for mod in m.modules()]

    def forward_backward():
        calls.clear()
        y = _logits(m(x))
        y.sum().backward()
        return y, len(calls)

    y0, plain_calls = forward_backward()
    g0 = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    y1, ckpt_calls = forward_backward()
    for h in hooks:
        h.remove()
    # Checkpointed modules run their forward again during backward; without that nothing was checkpointed.
    assert ckpt_calls > plain_calls, f"{name}: set_grad_checkpointing(True) recomputed nothing"
    torch.testing.assert_close(y1, y0)
    for n, p in m.named_parameters():
        if n in g0:
            torch.testing.assert_close(p.grad, g0[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["test_vit", "test_vit_modern"])
def test_torch_compile_agrees_with_eager(name):
    m = vitkit.create_model(name, num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    eager = m(x)
    compiled = torch.compile(m)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_distilled_returns_both_heads_in_training_and_average_in_eval():
    m = vitkit.create_model("test_deit_distilled", num_classes=6)
    x = torch.randn(2, 3, 32, 32)
    m.train()
    with torch.no_grad():
        cls_logits, dist_logits = m(x)
    m.eval()
    torch.testing.assert_close(m(x), (cls_logits + dist_logits) / 2)  # no dropout: train == eval numerics


def test_pooling_options_and_features_only():
    x = torch.randn(2, 3, 32, 32)
    feat = vitkit.create_model("test_vit", num_classes=0).eval()
    assert feat(x).shape == (2, 64)
    torch.testing.assert_close(feat(x), feat.forward_features(x)[:, 0])
    gap = vitkit.create_model("test_vit_gap", num_classes=0).eval()
    tokens = gap.forward_features(x)
    torch.testing.assert_close(gap.forward_head(tokens, pre_logits=True), gap.fc_norm(tokens.mean(1)))
    none = vitkit.create_model("test_vit", num_classes=0, global_pool="").eval()
    assert none(x).shape == (2, 1 + 16, 64)
    reg = vitkit.create_model("test_vit_reg")
    assert reg.num_prefix_tokens == 3 and reg.forward_features(x).shape == (2, 3 + 16, 64)


def test_reset_classifier_and_optimizer_hooks():
    m = vitkit.create_model("test_deit_distilled", num_classes=10)
    m.reset_classifier(3)
    assert m.head.out_features == 3 and m.head_dist.out_features == 3 and m.num_classes == 3
    m.reset_classifier(0)
    assert m.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 64)
    assert m.no_weight_decay() == {"pos_embed", "cls_token", "dist_token"}
    gm = m.group_matcher()
    assert re.match(gm["stem"], "patch_embed.proj.weight") and re.match(gm["blocks"][0][0], "blocks.1.attn.qkv.weight")
    rope = vitkit.create_model("test_vit_modern")
    assert rope.pos_embed is None and rope.no_weight_decay() == {"cls_token", "reg_token"}


def test_record_attention_does_not_change_outputs():
    m = vitkit.create_model("test_vit").eval()
    x = torch.randn(2, 3, 32, 32)
    y = m(x)
    with record_attention(m) as maps:
        y_cap = m(x)
    torch.testing.assert_close(y_cap, y, atol=1e-5, rtol=1e-5)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 17, 17)
    assert all(b.attn.captured is None for b in m.blocks)


def test_moe_aux_loss_exposed():
    m = vitkit.create_model("test_vit_moe")
    m(torch.randn(2, 3, 32, 32))
    aux = m.aux_loss()
    assert aux.ndim == 0 and aux.item() >= 0.99  # >= 1 by construction (Cauchy-Schwarz), 1 when balanced
    assert vitkit.create_model("test_vit").aux_loss().item() == 0.0


# Parameter counts of the ViT paper sizes (patch 16 / 14, 224, 1000 classes), the numbers
# students compute by hand: embed + blocks * (4 D^2 + 2 * 4 D^2 + biases and norms) + head.
@pytest.mark.parametrize("name,params", [
    ("vit_tiny_patch16_224", 5_717_416),
    ("vit_small_patch16_224", 22_050_664),
    ("vit_base_patch16_224", 86_567_656),
    ("vit_base_patch32_224", 88_224_232),
    ("vit_large_patch16_224", 304_326_632),
    ("vit_huge_patch14_224", 632_045_800),
    ("deit_tiny_distilled_patch16_224", 5_910_800),
])
def test_paper_sizes_param_counts(name, params):
    with torch.device("meta"):
        m = vitkit.create_model(name)
    assert sum(p.numel() for p in m.parameters()) == params


def test_every_registered_variant_builds():
    for name in vitkit.list_models():
        with torch.device("meta"):
            m = vitkit.create_model(name)
        card = vitkit.get_model_card(name)
        assert m.card.input_size == card.input_size and card.paper, name


def test_bad_inputs_have_clear_errors():
    m = vitkit.create_model("test_vit").eval()
    with pytest.raises(ValueError, match="expects 3 input channels, got 1"):
        m(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="4-D .* got 3-D.*unsqueeze"):
        m(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="floating point.*uint8"):
        m(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="30x32 is not a multiple of the patch size 8x8"):
        m(torch.randn(1, 3, 30, 32))
    assert vitkit.create_model("test_vit", dynamic_img_pad=True).eval()(torch.randn(1, 3, 30, 33)).shape == (1, 1000)
    with pytest.raises(ValueError, match="unknown model 'vit_smal_patch16_224'.*did you mean.*vit_small_patch16_224"):
        vitkit.create_model("vit_smal_patch16_224")
    with pytest.raises(ValueError, match="embed_dim 100 is not divisible by num_heads 3"):
        vitkit.create_model("test_vit", embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="img_size .* is not a multiple of patch_size"):
        vitkit.create_model("test_vit", img_size=30)
    with pytest.raises(ValueError, match="global_pool='token' needs class_token=True"):
        vitkit.create_model("test_vit", class_token=False)


@pytest.mark.parametrize("name", ["test_vit", "test_vit_modern", "test_vitdet"])
def test_run_blocks_in_ranges_equals_forward_tokens(name):
    """Blocks run in consecutive ranges (as ViT-Adapter runs them) give forward_tokens' tokens exactly,
    with RoPE and register tokens (test_vit_modern) and ViTDet's windows, checkpointed or not."""
    torch.manual_seed(0)
    m = vitkit.create_model(name, num_classes=0).train()
    x = torch.randn(2, 3, 32, 48)
    for ckpt in (False, True):
        m.set_grad_checkpointing(ckpt)
        tokens, ctx = m.embed(x)
        torch.manual_seed(1)
        ref = m.forward_tokens(tokens, ctx)
        torch.manual_seed(1)
        t = tokens
        for start, end in ((0, 1), (1, 3), (3, None)):
            t = m.run_blocks(t, ctx, start, end)
        torch.testing.assert_close(m.norm(t), ref, atol=0, rtol=0)


def test_pos_embed_interp():
    """At another grid the learned position embedding is resampled bilinearly (no antialiasing, as
    DPT's reference) or bicubically with antialiasing (timm's rule), computed here with torch alone."""
    F = torch.nn.functional
    x = torch.randn(1, 3, 48, 24)  # a 6x3 grid where the model has 4x4: one side up, one down
    for interp, kw in (("bilinear", {}), ("bicubic", {"antialias": True})):
        m = vitkit.create_model("test_vit", num_classes=0, pos_embed_interp=interp).eval()
        grid = m.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        expect = F.interpolate(grid, size=(6, 3), mode=interp, align_corners=False, **kw).flatten(2).transpose(1, 2)
        torch.testing.assert_close(m.embed(x)[1].pos_embed, expect, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="pos_embed_interp"):
        vitkit.create_model("test_vit", pos_embed_interp="nearest")
