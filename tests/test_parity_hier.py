"""Parity with timm for the hierarchical backbones: random weights, one state dict, equal logits.

The state dict goes through ``vitkit.load_weights`` (detect, convert, adapt), the path real
checkpoints take. Every parameter is perturbed first, so norms, biases and temperatures are not
at their trivial initial values.
"""

from functools import partial

import pytest
import torch
from helpers import lazy_peer, perturb

import vitkit
from vitkit.convert import load_weights

timm = lazy_peer("timm")
pytestmark = pytest.mark.peer("timm")

ATOL = 1e-5
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), num_classes=10)


_perturbed = partial(perturb, scale=0.02)


def _assert_same_logits(ours, theirs, x):
    with torch.no_grad():
        a, b = ours.eval()(x), theirs.eval()(x)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= ATOL, (a - b).abs().max().item()


def _ours_loaded(name: str, theirs, **kwargs):
    ours = vitkit.create_model(name, **kwargs)
    load_weights(ours, theirs.state_dict(), verbose=False)
    return ours


def test_swin_tiny_registered_config_matches_timm():
    theirs = _perturbed(timm.create_model("swin_tiny_patch4_window7_224", drop_path_rate=0.0))
    ours = _ours_loaded("swin_tiny_patch4_window7_224", theirs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 28_288_354
    _assert_same_logits(ours, theirs, torch.randn(1, 3, 224, 224))


@pytest.mark.parametrize("img", [224, 448])
def test_swin_small_config_any_size(img):
    # 448 px: 112/56/28/14 tokens per side, shifted windows in the first three stages.
    theirs = _perturbed(timm.models.swin_transformer.SwinTransformer(img_size=img, window_size=7, drop_path_rate=0.0, **SMALL))
    ours = _ours_loaded("swin_tiny_patch4_window7_224", theirs, **SMALL)  # built at 224, run at img
    _assert_same_logits(ours, theirs, torch.randn(2, 3, img, img))


def test_swin_relative_bias_resampled_to_another_window():
    """Weights trained with 7x7 windows, loaded into a model with 8x8 windows at 256 px."""
    src = _perturbed(timm.models.swin_transformer.SwinTransformer(img_size=224, window_size=7, drop_path_rate=0.0, **SMALL))
    theirs = timm.models.swin_transformer.SwinTransformer(img_size=256, window_size=8, drop_path_rate=0.0, **SMALL).eval()
    sd = {}
    for k, v in src.state_dict().items():
        if k.endswith("relative_position_bias_table"):
            v = timm.layers.pos_embed_rel.resize_rel_pos_bias_table_simple(v, (8, 8), (15 * 15, v.shape[1]))
        sd[k] = v
    theirs.load_state_dict(sd)
    ours = vitkit.create_model("swin_tiny_patch4_window7_224", window_size=8, img_size=256, **SMALL)
    report = load_weights(ours, src.state_dict(), verbose=False)
    assert any("relative_position_bias_table: window (7, 7) -> (8, 8)" in r for r in report.resampled)
    _assert_same_logits(ours, theirs, torch.randn(1, 3, 256, 256))


def test_swinv2_tiny_registered_config_matches_timm():
    theirs = _perturbed(timm.create_model("swinv2_tiny_window8_256", drop_path_rate=0.0))
    ours = _ours_loaded("swinv2_tiny_window8_256", theirs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    _assert_same_logits(ours, theirs, torch.randn(1, 3, 256, 256))


def test_swinv2_small_config_at_512():
    theirs = _perturbed(timm.models.swin_transformer_v2.SwinTransformerV2(img_size=512, window_size=8, drop_path_rate=0.0, **SMALL))
    ours = _ours_loaded("swinv2_tiny_window8_256", theirs, **SMALL)
    _assert_same_logits(ours, theirs, torch.randn(1, 3, 512, 512))


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b1"])
def test_pvt_v2_registered_configs_match_timm(name):
    theirs = _perturbed(timm.create_model(name, drop_path_rate=0.0))
    ours = _ours_loaded(name, theirs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    _assert_same_logits(ours, theirs, torch.randn(1, 3, 224, 224))


def test_pvt_v2_b2_and_a_size_that_does_not_divide():
    # 200 px: 50/25/13/7 tokens per side; the reduction convs floor 50/8 and 25/4 as timm's do.
    theirs = _perturbed(timm.models.pvt_v2.PyramidVisionTransformerV2(depths=(3, 4, 6, 3), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),
                                num_classes=10))
    ours = _ours_loaded("pvt_v2_b2", theirs, num_classes=10)
    _assert_same_logits(ours, theirs, torch.randn(1, 3, 200, 200))


def test_stage_maps_match_timm_feature_maps():
    theirs = _perturbed(timm.models.swin_transformer.SwinTransformer(img_size=224, window_size=7, drop_path_rate=0.0, **SMALL))
    ours = _ours_loaded("swin_tiny_patch4_window7_224", theirs, **SMALL)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a = ours.forward_intermediates(x, intermediates_only=True)
        b = theirs.forward_intermediates(x, intermediates_only=True)
    assert [f.shape for f in a] == [f.shape for f in b]
    for fa, fb in zip(a[:-1], b[:-1]):  # timm normalises its last map; vitkit does so only with norm=True
        torch.testing.assert_close(fa, fb, atol=ATOL, rtol=0)
