"""ViTDet's plain backbone: windowed attention checked against windows cut by hand, global blocks
and whole models against the plain ViT, decomposed relative positions by hand, plain ViT
checkpoints loading, and the simple pyramid at sizes that are not whole windows."""

from __future__ import annotations

import pytest
import torch
from helpers import require_peer
from safetensors.torch import save_file

import vitkit
from vitkit.models.vitdet import decomposed_rel_pos, global_blocks


def _attention_by_hand(attn, x, keys_valid=None, rel=None):
    """Plain softmax attention among the rows of x (n, C) with attn's weights; rel = (Rh, Rw, h, w)."""
    n, C = x.shape
    nh, d = attn.num_heads, attn.head_dim
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(n, 3, nh, d).permute(1, 2, 0, 3)  # (heads, n, d)
    logits = (q * d**-0.5) @ k.transpose(1, 2)  # (heads, n, n)
    if rel is not None:
        Rh, Rw, h, w = rel
        for a in range(n):
            for b in range(n):
                (i, j), (kk, ll) = divmod(a, w), divmod(b, w)
                logits[:, a, b] += q[:, a] @ Rh[i - kk + h - 1] + q[:, a] @ Rw[j - ll + w - 1]
    if keys_valid is not None:
        logits[:, :, ~keys_valid] = float("-inf")
    out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(n, C)
    return out @ attn.proj.weight.T + attn.proj.bias


def _windowed_block_by_hand(blk, x, grid, ws, padding, rel=False):
    """A ViTDet block from its definition: norm1, zero-pad to whole windows, attention inside each
    window cut out by hand, crop, residual; then the MLP residual."""
    B, N, C = x.shape
    H, W = grid
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    y = torch.zeros(B, Hp, Wp, C)
    y[:, :H, :W] = blk.norm1(x).reshape(B, H, W, C)
    valid = torch.zeros(Hp, Wp, dtype=torch.bool)
    valid[:H, :W] = True
    out = torch.zeros_like(y)
    for b in range(B):
        for r in range(0, Hp, ws):
            for c in range(0, Wp, ws):
                win = y[b, r:r + ws, c:c + ws].reshape(-1, C)
                keys = valid[r:r + ws, c:c + ws].reshape(-1) if padding == "mask" else None
                if keys is not None and not keys.any():
                    continue  # a window of padding only: cropped away
                table = (blk.attn.rel_pos_h, blk.attn.rel_pos_w, ws, ws) if rel else None
                out[b, r:r + ws, c:c + ws] = _attention_by_hand(blk.attn, win, keys, table).reshape(ws, ws, C)
    x = x + out[:, :H, :W].reshape(B, N, C)
    return x + blk.mlp(blk.norm2(x))


def _model(**kw):
    torch.manual_seed(0)
    return vitkit.create_model("test_vitdet", num_classes=0, **kw).eval()


@pytest.mark.parametrize("padding", ["zeros", "mask"])
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_windowed_block_matches_windows_cut_by_hand(padding, grid):
    m = _model(use_rel_pos=False, window_padding=padding)
    blk = m.blocks[0]
    assert blk.attn.window_size == 2
    x = torch.randn(2, grid[0] * grid[1], 64)
    with torch.no_grad():
        torch.testing.assert_close(blk(x, grid), _windowed_block_by_hand(blk, x, grid, 2, padding), atol=1e-5, rtol=1e-5)


def test_windowed_block_with_relative_positions_by_hand():
    m = _model(use_rel_pos=True)
    blk = m.blocks[2]
    with torch.no_grad():
        blk.attn.rel_pos_h.normal_()
        blk.attn.rel_pos_w.normal_()
        x = torch.randn(1, 15, 64)
        torch.testing.assert_close(blk(x, (3, 5)), _windowed_block_by_hand(blk, x, (3, 5), 2, "zeros", rel=True),
                                   atol=1e-5, rtol=1e-5)


def test_decomposed_rel_pos_by_hand_and_resampled_for_other_grids():
    h, w, d = 3, 4, 8
    q = torch.randn(2, 2, h * w, d)
    Rh, Rw = torch.randn(2 * h - 1, d), torch.randn(2 * w - 1, d)
    bias = decomposed_rel_pos(q, Rh, Rw, (h, w))
    for a in range(h * w):
        for b in range(h * w):
            (i, j), (k, l) = divmod(a, w), divmod(b, w)
            torch.testing.assert_close(bias[..., a, b], q[..., a, :] @ Rh[i - k + h - 1] + q[..., a, :] @ Rw[j - l + w - 1])
    # A table built for another grid is resampled linearly; a constant table stays constant.
    const = torch.ones(2 * 7 - 1, d)
    torch.testing.assert_close(decomposed_rel_pos(q, const, const, (h, w)), (2 * q.sum(-1))[..., None].expand(-1, -1, -1, h * w))


def test_global_blocks_are_plain_vit_blocks_and_covering_windows_give_the_plain_vit():
    # The plain ViT with the same layout (no class token, average pooling, final norm before pooling),
    # built at the input size (ViTDet resamples position embeddings as its reference does, without
    # antialiasing, the ViT as timm does). Window 4 on a 4x4 grid: one window, no padding. Windows
    # of 6 and 14 on a 4x6 grid: the padding must be masked to leave plain attention.
    for padding, window, size in (("zeros", 4, (32, 32)), ("mask", 6, (32, 48)), ("mask", 14, (32, 48))):
        torch.manual_seed(1)
        vit = vitkit.create_model("test_vit", depth=4, class_token=False, global_pool="avg", fc_norm=False,
                                  img_size=size).eval()
        m = vitkit.create_model("test_vitdet", window_size=window, use_rel_pos=False, window_padding=padding,
                                img_size=size).eval()
        m.load_state_dict(vit.state_dict())
        x = torch.randn(2, 3, *size)
        torch.testing.assert_close(m.forward_features(x), vit.forward_features(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(m(x), vit(x), atol=1e-6, rtol=1e-6)
    # A global block is the plain ViT block on the same tokens.
    m = vitkit.create_model("test_vitdet", use_rel_pos=False, img_size=(32, 48)).eval()
    m.load_state_dict(vit.state_dict())
    t = torch.randn(2, 24, 64)
    assert m.blocks[1].attn.window_size == 0
    with torch.no_grad():
        torch.testing.assert_close(m.blocks[1](t, (4, 6)), vit.blocks[1](t), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(m.blocks[0](t, (4, 6)), vit.blocks[0](t), atol=1e-3)  # windowed: not the same


@pytest.mark.peer("timm")
def test_covering_window_equals_timm_vit():
    timm = require_peer("timm")
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=64, depth=4, num_heads=2, class_token=False, global_pool="avg", fc_norm=False).eval()
    m = vitkit.create_model("test_vitdet", num_classes=0, window_size=4, use_rel_pos=False).eval()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)


def test_global_block_layout_of_the_paper():
    assert global_blocks(12) == (2, 5, 8, 11)
    assert global_blocks(24) == (5, 11, 17, 23)
    assert global_blocks(32) == (7, 15, 23, 31)
    with torch.device("meta"):
        base = vitkit.create_model("vitdet_base_patch16_1024")
    assert base.global_attn_indexes == (2, 5, 8, 11) and base.num_prefix_tokens == 0
    assert base.blocks[0].attn.window_size == 14 and base.blocks[2].attn.window_size == 0
    assert base.blocks[0].attn.rel_pos_h.shape == (27, 64)  # the 14-token window
    assert base.blocks[2].attn.rel_pos_h.shape == (127, 64)  # the 64x64 grid at 1024 px
    assert base.pos_embed.shape == (1, 64 * 64, 768)


def test_rel_pos_starts_at_zero_and_only_adds_those_keys():
    m = _model()
    vit = vitkit.create_model("test_vit", depth=4, num_classes=0, class_token=False, global_pool="avg", fc_norm=False)
    extra = set(m.state_dict()) - set(vit.state_dict())
    assert extra == {f"blocks.{i}.attn.rel_pos_{a}" for i in range(4) for a in "hw"}
    assert set(vit.state_dict()) <= set(m.state_dict())
    assert all(m.state_dict()[k].abs().sum() == 0 for k in extra)


@pytest.mark.parametrize("src", ["vitkit", pytest.param("timm", marks=pytest.mark.peer("timm"))])
def test_plain_vit_checkpoint_loads(src, tmp_path):
    if src == "timm":
        timm = require_peer("timm")
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                                depth=4, num_heads=2, num_classes=5)
    else:
        vit = vitkit.create_model("test_vit", depth=4, num_classes=5)  # with a class token and its position row
    sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(sd, str(tmp_path / "vit.safetensors"))
    m = vitkit.create_model("test_vitdet", num_classes=5)
    report = vitkit.load_weights(m, str(tmp_path / "vit.safetensors"), verbose=False)
    assert report.missing == [] and report.unexpected == []
    fresh = set(m.state_dict()) - set(sd)
    assert fresh == {f"blocks.{i}.attn.rel_pos_{a}" for i in range(4) for a in "hw"}
    assert set(sd) - set(m.state_dict()) == {"cls_token"}
    assert any("relative position" in n for n in report.notes) and any("cls_token" in n for n in report.notes)
    got = m.state_dict()
    for k in sd:
        if k == "pos_embed":
            torch.testing.assert_close(got[k], sd[k][:, 1:])  # the class token's row is dropped
        elif k != "cls_token":
            torch.testing.assert_close(got[k], sd[k], msg=k)


def test_pyramid_and_intermediates_at_sizes_that_are_not_whole_windows():
    m = _model()
    for size in ((24, 40), (40, 56), (8, 8)):
        x = torch.randn(2, 3, *size)
        pyr = m.forward_intermediates(x, pyramid=True, intermediates_only=True)
        h, w = size[0] // 8, size[1] // 8
        assert [tuple(f.shape[2:]) for f in pyr] == [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (-(-h // 2), -(-w // 2))]
        assert all(f.shape[:2] == (2, 64) for f in pyr)
        feats = m.forward_intermediates(x, indices=[0, 3], intermediates_only=True)
        assert [tuple(f.shape) for f in feats] == [(2, 64, h, w)] * 2


def test_gradient_reaches_every_parameter_through_the_pyramid():
    m = vitkit.create_model("test_vitdet", num_classes=0).train()
    pyr = m.forward_intermediates(torch.randn(2, 3, 24, 40), pyramid=True, intermediates_only=True)
    sum(f.square().mean() for f in pyr).backward()
    for n, p in m.named_parameters():
        if n.startswith("norm."):
            continue  # the final norm is not on the pyramid's path (norm=False)
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_run_blocks_is_the_token_path_in_pieces():
    m = _model()
    x = torch.randn(2, 3, 24, 40)
    tokens, ctx = m.embed(x)
    mid = m.run_blocks(tokens, ctx, 0, 2)
    torch.testing.assert_close(m.norm(m.run_blocks(mid, ctx, 2)), m.forward_features(x), atol=0, rtol=0)


def test_clear_errors():
    m = _model()
    tokens, ctx = m.embed(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="keep=.*plain ViT"):
        m.forward_tokens(tokens, ctx, keep=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="no prefix tokens"):
        vitkit.create_model("test_vitdet", class_token=True)
    with pytest.raises(ValueError, match="window_padding"):
        vitkit.create_model("test_vitdet", window_padding="reflect")
    with pytest.raises(ValueError, match="out of range"):
        vitkit.create_model("test_vitdet", global_attn_indexes=(7,))
    with pytest.raises(ValueError, match="whole 4x4 token map"):
        m.blocks[0](tokens[:, :10], (4, 4))


@pytest.mark.peer("transformers")
@pytest.mark.parametrize("size", [(32, 32), (40, 56)])  # the build grid, and a grid of part windows (resampled)
def test_matches_transformers_vitdet(size):
    transformers = require_peer("transformers")
    cfg = transformers.VitDetConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=4, image_size=32, pretrain_image_size=32,
        patch_size=8, window_size=2, window_block_indices=[0, 2], use_relative_position_embeddings=True,
        layer_norm_eps=1e-6, drop_path_rate=0.0,
    )
    torch.manual_seed(0)
    ref = transformers.VitDetModel(cfg).eval()  # random relative position tables: they take part
    sd = {}
    for k, v in ref.state_dict().items():
        k = k.replace("embeddings.projection", "patch_embed.proj").replace("encoder.layer.", "blocks.")
        k = k.replace(".attention.", ".attn.")
        sd[k] = v[:, 1:] if k == "embeddings.position_embeddings" else v
    sd["pos_embed"] = sd.pop("embeddings.position_embeddings")
    m = vitkit.create_model("test_vitdet", num_classes=0).eval()
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert set(missing) == {"norm.weight", "norm.bias"} and not unexpected  # the reference has no final norm
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expect = ref(x).last_hidden_state
        got = m.forward_intermediates(x, indices=[-1], intermediates_only=True)[0]
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def test_checkpoint_pos_embed_resampled_as_the_reference_does(tmp_path):
    vit = vitkit.create_model("test_vit", depth=4)  # a 4x4 grid plus the class token's row
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    m = vitkit.create_model("test_vitdet", img_size=48)  # a 6x6 grid
    report = vitkit.load_weights(m, str(tmp_path / "vit.safetensors"), verbose=False)
    grid = vit.pos_embed[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expect = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(m.pos_embed, expect.flatten(2).transpose(1, 2))
    assert any("(4, 4) -> (6, 6)" in r for r in report.resampled)
