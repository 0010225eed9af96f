import math

import pytest
import torch
import torch.nn.functional as F

from vitkit.layers import (
    Attention,
    Block,
    DropPath,
    LayerScale,
    Mlp,
    MoEMlp,
    PatchEmbed,
    RMSNorm,
    RotaryEmbedding2D,
    SwiGLU,
    apply_rope,
    capture_attention,
    record_attention,
    resample_abs_pos_embed,
    sincos_2d_pos_embed,
)
from vitkit.layers.rel_pos import table_bias


@pytest.mark.parametrize("patch,chans", [(16, 3), (8, 1), (14, 5), (32, 3)])
def test_patch_embed_equals_flatten_linear(patch, chans):
    pe = PatchEmbed(img_size=patch * 3, patch_size=patch, in_chans=chans, embed_dim=24)
    x = torch.randn(2, chans, patch * 3, patch * 2)
    out = pe(x)
    # Flatten each patch (C, p, p) and apply the same weights as a Linear layer.
    patches = x.unfold(2, patch, patch).unfold(3, patch, patch)  # (B, C, H', W', p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 6, chans * patch * patch)
    ref = F.linear(patches, pe.proj.weight.reshape(24, -1), pe.proj.bias)
    assert out.shape == (2, 6, 24)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_patch_embed_rejects_non_multiple_and_pads_on_request():
    pe = PatchEmbed(img_size=32, patch_size=16, embed_dim=8)
    with pytest.raises(ValueError, match="30x32 is not a multiple of the patch size 16x16"):
        pe(torch.randn(1, 3, 30, 32))
    padded = PatchEmbed(img_size=32, patch_size=16, embed_dim=8, dynamic_pad=True)
    assert padded(torch.randn(1, 3, 30, 33)).shape == (1, 2 * 3, 8)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        PatchEmbed(img_size=30, patch_size=16)


def test_resample_pos_embed_keeps_prefix_and_identity():
    pe = torch.randn(1, 2 + 16, 8)
    same = resample_abs_pos_embed(pe, (4, 4), num_prefix_tokens=2)
    assert same is pe
    out = resample_abs_pos_embed(pe, (6, 3), num_prefix_tokens=2)
    assert out.shape == (1, 2 + 18, 8)
    torch.testing.assert_close(out[:, :2], pe[:, :2])
    # A constant grid stays constant under bicubic resampling.
    const = torch.ones(1, 1 + 9, 4)
    torch.testing.assert_close(resample_abs_pos_embed(const, (5, 5)), torch.ones(1, 26, 4))
    with pytest.raises(ValueError, match="not a square"):
        resample_abs_pos_embed(torch.randn(1, 1 + 10, 4), (4, 4))


def test_sincos_hand_computed():
    pe = sincos_2d_pos_embed(8, (2, 3))
    assert pe.shape == (6, 8)
    # Token (row 1, col 2) -> x = 2, y = 1; omega = [1, 1e-2] for quarter = 2.
    x, y = 2.0, 1.0
    expect = [math.sin(x), math.sin(x / 100), math.cos(x), math.cos(x / 100),
              math.sin(y), math.sin(y / 100), math.cos(y), math.cos(y / 100)]
    torch.testing.assert_close(pe[1 * 3 + 2], torch.tensor(expect), atol=1e-6, rtol=0)


def test_rope_preserves_norm_and_relative_positions():
    rope = RotaryEmbedding2D(head_dim=8)
    sin, cos = rope((3, 4))
    q = torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8)
    qr, kr = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))
    # <q_i, k_j> depends only on the offset: tokens (0,0)-(1,1) and (1,2)-(2,3) share it.
    dots = qr[0, 0] @ kr[0, 0].T
    torch.testing.assert_close(dots[0 * 4 + 0, 1 * 4 + 1], dots[1 * 4 + 2, 2 * 4 + 3], atol=1e-5, rtol=1e-5)
    prefixed = apply_rope(torch.randn(1, 1, 14, 8), sin, cos, num_prefix_tokens=2)
    assert prefixed.shape == (1, 1, 14, 8)


def test_rope_on_a_subset_equals_the_full_table_rows():
    rope = RotaryEmbedding2D(head_dim=8)
    sin, cos = rope((3, 5))
    positions = torch.tensor([[14, 0, 7], [3, 3, 9]])
    sub_sin, sub_cos = rope((3, 5), positions)
    assert sub_sin.shape == (2, 1, 3, 8)
    assert torch.equal(sub_sin[:, 0], sin[positions]) and torch.equal(sub_cos[:, 0], cos[positions])
    # Per-sample tables rotate each sample's tokens as the full table rotates them there.
    q = torch.randn(2, 2, 15, 8)
    full = apply_rope(q, sin, cos)
    sub = apply_rope(torch.stack([q[b, :, positions[b]] for b in range(2)]), sub_sin, sub_cos)
    assert torch.equal(sub, torch.stack([full[b, :, positions[b]] for b in range(2)]))


def test_relative_position_bias_symmetry():
    table = torch.randn(5 * 5, 2)  # a (2w-1)^2 table for a 3x3 window, 2 heads
    bias = table_bias(table, (3, 3), (3, 3))
    assert bias.shape == (2, 9, 9)
    # The same offset maps to the same table row: (0 -> 4) and (4 -> 8) are both (+1, +1).
    torch.testing.assert_close(bias[:, 0, 4], bias[:, 4, 8])
    torch.testing.assert_close(bias[:, 0, 0], bias[:, 5, 5])


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_fused_equals_manual_and_capture(qk_norm):
    attn = Attention(32, num_heads=4, qk_norm=qk_norm).eval()
    x = torch.randn(2, 7, 32)
    fused = attn(x)
    with record_attention(attn) as maps:
        manual = attn(x)
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-5)
    assert len(maps) == 1 and maps[0].shape == (2, 4, 7, 7)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 4, 7))
    assert attn.captured is None


def test_attention_bad_heads():
    with pytest.raises(ValueError, match="embed_dim 100 is not divisible by num_heads 3"):
        Attention(100, num_heads=3)


def test_mlp_swiglu_shapes_and_math():
    x = torch.randn(3, 5, 16)
    assert Mlp(16, 64)(x).shape == (3, 5, 16)
    sw = SwiGLU(16, 32)
    ref = sw.fc2(F.silu(sw.fc1_g(x)) * sw.fc1_x(x))
    torch.testing.assert_close(sw(x), ref)


def test_moe_routes_top_k_and_aux_loss():
    torch.manual_seed(0)
    moe = MoEMlp(16, 32, num_experts=4, top_k=2)
    x = torch.randn(2, 6, 16)
    y = moe(x)
    assert y.shape == x.shape
    # Hand-computed reference: weighted sum of each token's top-2 experts.
    flat = x.reshape(-1, 16)
    probs = moe.router(flat).softmax(-1)
    w, idx = probs.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    ref = torch.stack([
        sum(w[t, s] * moe.experts[int(idx[t, s])](flat[t:t + 1])[0] for s in range(2)) for t in range(flat.shape[0])
    ])
    torch.testing.assert_close(y.reshape(-1, 16), ref, atol=1e-5, rtol=1e-5)
    frac = torch.zeros(4).index_add_(0, idx.flatten(), torch.ones(idx.numel())) / idx.numel()
    torch.testing.assert_close(moe.aux_loss, 4 * (frac * probs.mean(0)).sum())
    y.sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_moe_balanced_aux_loss_is_one():
    moe = MoEMlp(4, 8, num_experts=2, top_k=1)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    x = torch.zeros(4, 4)
    x[:2, 0], x[2:, 0] = 50.0, -50.0  # two tokens per expert, router almost one-hot
    moe(x)
    assert abs(moe.aux_loss.item() - 1.0) < 1e-4


def test_rmsnorm_hand_computed():
    n = RMSNorm(4, eps=0.0)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(n(x), x / math.sqrt(7.5))


def test_droppath_eval_identity_and_train_expectation():
    dp = DropPath(0.5)
    x = torch.ones(4000, 3)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert abs(y.mean().item() - 1.0) < 0.1
    with pytest.raises(ValueError):
        DropPath(1.0)


def test_layerscale_and_block_variants():
    ls = LayerScale(4, 0.1)
    torch.testing.assert_close(ls(torch.ones(1, 4)), torch.full((1, 4), 0.1))
    x = torch.randn(2, 5, 32)
    pre = Block(32, 4, init_values=1e-5).eval()
    assert (pre(x) - x).abs().max() < 1e-3  # a tiny LayerScale keeps the block near identity
    post = Block(32, 4, post_norm=True).eval()
    out = post(x)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)  # ends in a LayerNorm


def test_attention_gradcheck_float64():
    attn = Attention(8, num_heads=2, qk_norm=True).double()
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: attn(t), (x,))
    rms = RMSNorm(8).double()
    assert torch.autograd.gradcheck(lambda t: rms(t), (x,))


def test_layers_capture_attention_is_a_deprecated_alias():
    attn = Attention(16, num_heads=2).eval()
    with pytest.warns(DeprecationWarning, match="record_attention"), capture_attention(attn) as maps:
        attn(torch.randn(1, 3, 16))
    assert len(maps) == 1
