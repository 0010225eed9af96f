"""Hierarchical backbones (Swin v1/v2, PVT v2): windows, masks, multi-scale maps, and the tools
that used to assume a ViT (info, plan, FSDP units, weight adaptation)."""

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.convert import load_weights
from vitkit.layers import record_attention
from vitkit.layers.pyramid import pyramid_plan
from vitkit.layers.rel_pos import resample_rel_pos_table
from vitkit.layers.windows import window_and_shift, window_mask
from vitkit.models.info import model_info
from vitkit.models.swin import SwinBlock

HIER = ["test_swin", "test_swinv2", "test_pvt_v2"]


def test_window_rule_hand_cases():
    assert window_and_shift((56, 56), (7, 7), (3, 3)) == ((7, 7), (3, 3))
    assert window_and_shift((8, 8), (7, 7), (3, 3)) == ((7, 7), (3, 3))  # padded to 14, still shifted
    assert window_and_shift((7, 7), (7, 7), (3, 3)) == ((7, 7), (0, 0))  # one window: no shift
    assert window_and_shift((2, 9), (7, 7), (3, 3)) == ((2, 7), (0, 3))  # per axis
    assert window_and_shift((1, 1), (7, 7), (3, 3)) == ((1, 1), (0, 0))


def test_window_mask_is_same_region_and_real_key():
    """Reference: in the padded map rolled by -s, two tokens of one window may attend iff both
    (or neither) wrapped round on each axis, and the key is an image token, not padding."""
    H, W, win, shift = 5, 7, (3, 3), (1, 1)
    Hp, Wp = 6, 9
    mask = window_mask((H, W), win, shift, torch.device("cpu"))
    nW = (Hp // 3) * (Wp // 3)
    assert mask.shape == (nW, 9, 9)
    for w in range(nW):
        wy, wx = divmod(w, Wp // 3)
        cells = [(wy * 3 + i // 3, wx * 3 + i % 3) for i in range(9)]  # rolled positions
        for qi, (qy, qx) in enumerate(cells):
            for ki, (ky, kx) in enumerate(cells):
                oy, ox = (ky + shift[0]) % Hp, (kx + shift[1]) % Wp  # the key's place in the padded image
                same = (qy + shift[0] >= Hp) == (ky + shift[0] >= Hp) and (qx + shift[1] >= Wp) == (kx + shift[1] >= Wp)
                allowed = same and oy < H and ox < W
                assert mask[w, qi, ki].item() == (0.0 if allowed else -100.0), (w, qi, ki)
    assert window_mask((6, 6), (3, 3), (0, 0), torch.device("cpu")) is None  # no shift, no padding


def test_swin_block_attention_equals_brute_force():
    """One shifted block with padding, against per-token attention over the allowed keys."""
    torch.manual_seed(0)
    blk = SwinBlock(8, num_heads=2, window_size=(3, 3), shifted=True).eval()
    H, W, C = 5, 7, 8
    x = torch.randn(1, H, W, C)
    out = blk._attn(x)
    attn = blk.attn
    qkv = attn.qkv(x).reshape(H, W, 3, 2, 4)
    table = attn.relative_position_bias_table  # (5*5, heads)
    s = (1, 1)  # window 3x3, shift 1
    Hp, Wp = 6, 9

    def rolled(y, x_):  # position of image token (y, x) in the padded map rolled by -s
        return (y - s[0]) % Hp, (x_ - s[1]) % Wp

    ref = torch.zeros(H, W, C)
    for y in range(H):
        for x_ in range(W):
            ry, rx = rolled(y, x_)
            keys, bias = [], []
            for ky in range(H):
                for kx in range(W):
                    sy, sx = rolled(ky, kx)
                    if (sy // 3, sx // 3) != (ry // 3, rx // 3):
                        continue
                    if (ry + s[0] >= Hp) != (sy + s[0] >= Hp) or (rx + s[1] >= Wp) != (sx + s[1] >= Wp):
                        continue
                    keys.append((ky, kx))
                    bias.append(table[(ry - sy + 2) * 5 + (rx - sx + 2)])
            q = qkv[y, x_, 0]  # (heads, hd)
            k = torch.stack([qkv[a, b, 1] for a, b in keys], 1)  # (heads, K, hd)
            v = torch.stack([qkv[a, b, 2] for a, b in keys], 1)
            logits = (q[:, None] * k).sum(-1) * 4**-0.5 + torch.stack(bias, 1)  # (heads, K)
            o = (logits.softmax(-1)[..., None] * v).sum(1)  # (heads, hd)
            ref[y, x_] = attn.proj(o.reshape(C))
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", HIER)
def test_feature_info_and_intermediates(name):
    m = vitkit.create_model(name).eval()
    assert [f["reduction"] for f in m.feature_info] == [2, 4, 8, 16]  # test variants: stem stride 2
    x = torch.randn(2, 3, 40, 56)
    maps = m.forward_intermediates(x, intermediates_only=True)
    assert len(maps) == 4
    for f, info in zip(maps, m.feature_info):
        r = info["reduction"]
        assert f.shape == (2, info["num_chs"], -(-40 // r), -(-56 // r))
    assert m.pyramid_info() == m.feature_info


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "pvt_v2_b1"])
def test_real_variants_give_stride_4_to_32(name):
    with torch.device("meta"):
        m = vitkit.create_model(name)
    assert [f["reduction"] for f in m.feature_info] == [4, 8, 16, 32]
    maps = m.forward_intermediates(torch.empty(1, 3, 224, 224, device="meta"), intermediates_only=True)
    assert [tuple(f.shape[1:]) for f in maps] == [(f["num_chs"], 224 // f["reduction"], 224 // f["reduction"])
                                                  for f in m.feature_info]


def test_vit_simple_pyramid():
    m = vitkit.create_model("test_vit").eval()  # patch 8
    x = torch.randn(2, 3, 32, 48)
    info = m.pyramid_info()
    assert [i["reduction"] for i in info] == [2, 4, 8, 16]
    final, maps = m.forward_intermediates(x, pyramid=True)
    assert [tuple(f.shape) for f in maps] == [(2, 64, 16, 24), (2, 64, 8, 12), (2, 64, 4, 6), (2, 64, 2, 3)]
    last = m.forward_intermediates(x, indices=1, intermediates_only=True)[0]
    torch.testing.assert_close(maps[2], last)
    torch.testing.assert_close(maps[3], F.max_pool2d(last, 2))
    torch.testing.assert_close(final, m.forward_features(x))
    # The default is unchanged: one map per block.
    assert len(m.forward_intermediates(x, intermediates_only=True)) == 2


@pytest.mark.parametrize("name", HIER)
def test_token_path_and_capture(name):
    m = vitkit.create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens, ctx = m.embed(x)
    torch.testing.assert_close(m.forward_tokens(tokens, ctx), m.forward_features(x))
    with pytest.raises(ValueError, match="whole token grid"):
        m.forward_tokens(tokens, ctx, keep=torch.zeros(2, 3, dtype=torch.long))
    y = m(x)
    with record_attention(m) as maps:
        y_cap = m(x)
    torch.testing.assert_close(y_cap, y, atol=1e-5, rtol=1e-5)
    assert len(maps) == len(m.block_modules())
    assert all(torch.allclose(a.sum(-1), torch.ones(())) for a in maps)  # rows are distributions


def test_swin_tiny_trains_a_step_at_cifar_size():
    m = vitkit.create_model("swin_tiny_patch4_window7_224", num_classes=10).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    loss = F.cross_entropy(m(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    # 32 px: 8x8, 4x4, 2x2, 1x1 tokens: windows shrink to the map, no shift after stage 1.
    assert [s["window"] for s in m.attention_stats(32, 32)] == [[7, 7], [4, 4], [2, 2], [1, 1]]


def test_relative_bias_resampling():
    t = torch.randn(13 * 13, 3)
    assert resample_rel_pos_table(t, (7, 7), (7, 7)) is t
    const = torch.full((13 * 13, 2), 0.5)
    torch.testing.assert_close(resample_rel_pos_table(const, (7, 7), (12, 12)), torch.full((23 * 23, 2), 0.5))
    with pytest.raises(ValueError, match="expected 13x13"):
        resample_rel_pos_table(torch.randn(10, 2), (7, 7), (8, 8))


def test_weights_load_across_window_sizes_and_round_trip(tmp_path):
    src = vitkit.create_model("test_swin", num_classes=3).eval()
    path = vitkit.save_weights(src, tmp_path / "swin.safetensors")
    back = vitkit.create_model(str(path)).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(back(x), src(x))
    wider = vitkit.create_model("test_swin", num_classes=3, window_size=6)
    report = load_weights(wider, src.state_dict(), verbose=False)
    assert sum("window (4, 4) -> (6, 6)" in r for r in report.resampled) == 8  # one table per block


def test_info_per_stage_for_swin_tiny():
    info = model_info("swin_tiny_patch4_window7_224", resolutions=(224,))
    r = info["resolutions"][0]
    st = r["stages"]
    assert [s["tokens"] for s in st] == [56 * 56, 28 * 28, 14 * 14, 7 * 7]
    assert [s["keys_per_query"] for s in st] == [49] * 4
    assert st[0]["attn_elems"] == 3 * 56 * 56 * 49
    assert r["attn_matrix_mib_fp32_per_layer"] == max(s["attn_elems"] for s in st) * 4 / 2**20
    assert abs(r["gmacs"] - 4.5) < 0.1  # the Swin-T number of the paper's tables
    assert abs(sum(s["gflops"] for s in st) - r["gflops"]) < 0.1 * r["gflops"]  # stages carry the cost
    assert info["depth"] == 12 and info["params"] == 28_288_354
    pvt = model_info("pvt_v2_b1", resolutions=(224,))["resolutions"][0]["stages"]
    assert [s["keys_per_query"] for s in pvt] == [7 * 7] * 4  # 56/8, 28/4, 14/2, 7/1


def test_plan_and_fsdp_ask_the_model():
    from vitkit.plan import Candidate, _first_stage_tokens

    assert _first_stage_tokens(Candidate("swin_tiny_patch4_window7_224", 224)) == 56 * 56
    assert _first_stage_tokens(Candidate("vit_nano_convstem_patch4_32", 32)) == 64
    with torch.device("meta"):
        assert len(vitkit.create_model("swin_tiny_patch4_window7_224").block_modules()) == 12
        assert len(vitkit.create_model("pvt_v2_b2").block_modules()) == 16
        assert len(vitkit.create_model("test_vit").block_modules()) == 2


def test_models_listed():
    assert vitkit.list_models("swin*") == [
        "swin_base_patch4_window7_224", "swin_small_patch4_window7_224", "swin_tiny_patch4_window7_224",
        "swinv2_tiny_window8_256",
    ]
    assert vitkit.list_models("pvt*") == ["pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2"]


def test_pyramid_plan_hand_cases():
    assert pyramid_plan([4, 8, 16, 32]) == [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0)]
    # the deepest map at each stride; stride 64 is not a level
    assert pyramid_plan([2, 4, 8, 16, 16, 32, 64]) == [(1, 1.0), (2, 1.0), (4, 1.0), (5, 1.0)]
    # isotropic: the last map, upsampled and pooled (the simple pyramid)
    assert pyramid_plan([16, 16, 16]) == [(2, 4.0), (2, 2.0), (2, 1.0), (2, 0.5)]
    # nothing coarse enough: the deepest finer map, pooled
    assert pyramid_plan([2, 4, 8]) == [(1, 1.0), (2, 1.0), (2, 0.5), (2, 0.25)]
    with pytest.raises(ValueError, match="at least one"):
        pyramid_plan([])


DENSE = ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "pvt_v2_b0", "levit_128s", "mobilevit_xxs",
         "efficientformer_l1", "vim_tiny", "vit_small_patch16_224", "convnext_atto", "resnet18", "cait_xxs24_224",
         "convit_tiny", "mixer_s16_224"]


@pytest.mark.parametrize("name", DENSE)
def test_every_dense_backbone_gives_four_maps_at_strides_4_to_32(name):
    size = 64  # the real architectures at a small input: every stride divides it
    m = vitkit.create_model(name, img_size=size).eval()
    x = torch.randn(1, 3, size, size)
    info = m.pyramid_info()
    assert [i["reduction"] for i in info] == [4, 8, 16, 32]
    with torch.no_grad():
        final, maps = m.forward_intermediates(x, pyramid=True)
        tokens = m.forward_intermediates(x, pyramid=True, intermediates_only=True, output_fmt="NLC")
        torch.testing.assert_close(final, m.forward_features(x))
    assert [tuple(f.shape) for f in maps] == [(1, i["num_chs"], size // i["reduction"], size // i["reduction"])
                                              for i in info]
    for f, t in zip(maps, tokens):
        torch.testing.assert_close(t, f.flatten(2).transpose(1, 2))


def test_levit_pyramid_takes_the_stem_at_4_and_8_and_the_stages_at_16_and_32():
    m = vitkit.create_model("levit_128s").eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        maps = m.forward_intermediates(x, pyramid=True, intermediates_only=True)
        s = m.stem
        s4 = s.act2(s.conv2(s.act1(s.conv1(x))))
        s8 = s.act3(s.conv3(s4))
        stages = m.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for got, want in zip(maps, [s4, s8, *stages]):
        torch.testing.assert_close(got, want)
    assert [i["module"] for i in m.pyramid_info()] == ["stem.act2", "stem.act3", "stages.0", "stages.1"]
    assert [i["num_chs"] for i in m.pyramid_info()] == [32, 64, 128, 256]
    m.fuse()  # BatchNorm folded: the same levels, within float error
    with torch.no_grad():
        fused = m.forward_intermediates(x, pyramid=True, intermediates_only=True)
    for a, b in zip(fused, maps):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_vim_pyramid_is_the_simple_pyramid_of_its_last_layer():
    m = vitkit.create_model("test_vim").eval()  # patch 8
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        maps = m.forward_intermediates(x, pyramid=True, intermediates_only=True)
        last = m.forward_intermediates(x, indices=1, intermediates_only=True)[0]
    want = [F.interpolate(last, scale_factor=2.0, mode="bilinear", align_corners=False), last,
            F.max_pool2d(last, 2), F.max_pool2d(last, 4)]
    for got, w in zip(maps, want):
        torch.testing.assert_close(got, w)
    with pytest.raises(ValueError, match="prefix tokens"):
        m.forward_intermediates(x, pyramid=True, return_prefix_tokens=True)
