"""LeViT, MobileViT and EfficientFormer: parity with timm, multi-scale features, BatchNorm folding.

Each parity case builds the timm model, randomises every parameter and BatchNorm statistic
(timm initialises biases and BN to constants, which would hide a tensor mapped to the wrong
place), loads its state dict into the vitkit model through ``load_weights`` and compares
float32 outputs in eval mode.
"""

from __future__ import annotations

import pytest
import torch
from helpers import lazy_peer
from helpers import max_diff as _max_diff
from helpers import perturb as _randomise

import vitkit
from vitkit import load_weights
from vitkit.layers.offset_bias import OffsetBias
from vitkit.models.efficientformer import EfficientFormer
from vitkit.models.levit import Levit

timm = lazy_peer("timm")
needs_timm = pytest.mark.peer("timm")

ATOL = 1e-5


def _parity(peer: torch.nn.Module, ours: torch.nn.Module, size: int) -> None:
    _randomise(peer)
    report = load_weights(ours, peer.state_dict(), verbose=False)
    assert report.format == "timm" and not report.dropped and not report.resampled
    ours.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert _max_diff(ours(x), peer(x)) <= ATOL
        # The stage maps agree too, so dense heads see the same features.
        _, ours_maps = ours.forward_intermediates(x, norm=True)
        _, peer_maps = peer.forward_intermediates(x, norm=True)
        assert len(ours_maps) == len(peer_maps) == len(ours.feature_info)
        for a, b, info in zip(ours_maps, peer_maps, ours.feature_info):
            assert a.shape == (2, info["num_chs"], -(-size // info["reduction"]), -(-size // info["reduction"]))
            assert _max_diff(a, b) <= ATOL


TINY_LEVIT = dict(embed_dim=(32, 48, 64), key_dim=16, num_heads=(2, 3, 4), depth=(1, 2, 1))


@needs_timm
@pytest.mark.parametrize("act", ["hard_swish", "silu"])
def test_levit_tiny_parity(act):
    peer = timm.models.levit.LevitDistilled(img_size=128, num_classes=10, act_layer=act, **TINY_LEVIT)
    _parity(peer, Levit(img_size=128, num_classes=10, act_layer=act, **TINY_LEVIT), 128)


@needs_timm
# MobileViT at 72 px: 9x9, 5x5 and 3x3 maps take the transformer's resize-to-whole-patches path.
@pytest.mark.parametrize("name,size", [("levit_128s", 224), ("mobilevit_xxs", 72), ("efficientformer_l1", 224)])
def test_registered_variant_parity(name, size):
    _parity(timm.create_model(name, num_classes=10), vitkit.create_model(name, num_classes=10), size)


@needs_timm
def test_efficientformer_tiny_parity():
    cfg = dict(depths=(1, 1, 2), embed_dims=(16, 24, 32), num_vit=2)
    peer = timm.models.efficientformer.EfficientFormer(num_classes=10, **cfg)
    # timm's attention has fixed widths (key 32, 8 heads) and a 7x7 table: 112 px / 16 = 7.
    _parity(peer, EfficientFormer(img_size=112, num_classes=10, **cfg), 112)


@needs_timm
@pytest.mark.parametrize("name", ["levit_128s", "levit_128", "levit_192", "levit_256", "mobilevit_xxs",
                                  "mobilevit_xs", "mobilevit_s", "efficientformer_l1"])
def test_parameter_names_and_shapes_match_timm(name):
    with torch.device("meta"):
        peer = timm.create_model(name)
        ours = vitkit.create_model(name)
    peer_sd = {k: v.shape for k, v in peer.state_dict().items() if not k.endswith("attention_bias_idxs")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == peer_sd


@pytest.mark.parametrize("name", ["levit_128s", "mobilevit_s", "efficientformer_l1"])
def test_feature_info_states_real_strides(name):
    with torch.device("meta"):
        m = vitkit.create_model(name)
    strides = [f["reduction"] for f in m.feature_info]
    expected = {"levit_128s": [16, 32, 64], "mobilevit_s": [2, 4, 8, 16, 32], "efficientformer_l1": [4, 8, 16, 32]}
    assert strides == expected[name]
    assert m.feature_info[-1]["num_chs"] == m.num_features


@pytest.mark.parametrize("name", ["test_levit", "test_mobilevit", "test_efficientformer"])
def test_intermediates_follow_feature_info_at_any_size(name):
    m = vitkit.create_model(name).eval()
    x = torch.randn(1, 3, 40, 56)
    maps = m.forward_intermediates(x, intermediates_only=True)
    assert len(maps) == len(m.feature_info)
    for f, info in zip(maps, m.feature_info):
        r = info["reduction"]
        assert f.shape[1] == info["num_chs"] and f.shape[2:] == (-(-40 // r), -(-56 // r)), (f.shape, info)
    last_two = m.forward_intermediates(x, indices=2, intermediates_only=True, output_fmt="NLC")
    torch.testing.assert_close(last_two[-1], maps[-1].flatten(2).transpose(1, 2))


@pytest.mark.parametrize("name", ["test_levit", "levit_128s"])
def test_levit_fuse_folds_batchnorm_exactly(name):
    m = _randomise(vitkit.create_model(name, num_classes=10))
    size = m.card.input_size[1]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        before = m(x)
        m.fuse()
        after = m(x)
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    # Folding reorders float32 arithmetic: equal up to rounding (relative, as logits grow with depth).
    torch.testing.assert_close(after, before, atol=ATOL, rtol=1e-5)


def test_offset_bias_uses_the_stored_offsets_and_resamples_larger_grids():
    ob = OffsetBias(num_heads=2, resolution=(4, 5))
    with torch.no_grad():
        ob.attention_biases.copy_(torch.randn(2, 20))
    bias = ob.offset_bias((3, 4))  # a smaller grid: entries come straight from the table
    # Query (0, 1) and key (2, 3): offset (2, 2) -> entry 2 * 5 + 2 of the build-size table.
    assert bias.shape == (2, 12, 12)
    torch.testing.assert_close(bias[:, 0 * 4 + 1, 2 * 4 + 3], ob.attention_biases[:, 2 * 5 + 2])
    down = ob.offset_bias((4, 5), stride=2)  # queries on (0|2) x (0|2|4)
    assert down.shape == (2, 6, 20)
    torch.testing.assert_close(down[:, 5, 0], ob.attention_biases[:, 2 * 5 + 4])  # query (2, 4) to key (0, 0)
    assert ob.offset_bias((6, 7)).shape == (2, 42, 42)
    with torch.no_grad():  # inference reuses the gathered bias until the table changes
        first = ob.offset_bias((3, 4))
        assert ob.offset_bias((3, 4)) is first
        ob.attention_biases.add_(1.0)
        torch.testing.assert_close(ob.offset_bias((3, 4)), first + 1.0)
    assert ob.offset_bias((3, 4)).requires_grad  # with autograd it is always rebuilt from the table


def test_distilled_heads_train_vs_eval():
    for name in ("test_levit", "test_efficientformer"):
        m = vitkit.create_model(name, num_classes=6)
        x = torch.randn(2, 3, 32, 32)
        m.train()
        with torch.no_grad():
            cls_logits, dist_logits = m(x)
            feats = m.forward_features(x)
        m.eval()
        # Training BatchNorm uses batch statistics; compare the heads on the same features instead.
        torch.testing.assert_close(m.forward_head(feats), (m.head(feats.mean(1)) + m.head_dist(feats.mean(1))) / 2)
        assert cls_logits.shape == dist_logits.shape == (2, 6)
        m.reset_classifier(3)
        assert m.head.__class__ is m.head_dist.__class__ and m.num_classes == 3
        assert m.eval()(x).shape == (2, 3)


def test_mobilevit_head_and_hooks():
    m = vitkit.create_model("test_mobilevit", num_classes=5)
    m.reset_classifier(0)
    x = torch.randn(2, 3, 32, 32)
    assert m.eval()(x).shape == (2, 48)
    torch.testing.assert_close(m(x), m.forward_features(x).mean(1))
    assert m.no_weight_decay() == set()
    lv = vitkit.create_model("test_levit")
    assert lv.no_weight_decay() and all("attention_biases" in n for n in lv.no_weight_decay())


@pytest.mark.parametrize("pattern,names", [
    ("levit*", {"levit_128s", "levit_128", "levit_192", "levit_256"}),
    ("mobilevit*", {"mobilevit_xxs", "mobilevit_xs", "mobilevit_s"}),
    ("efficientformer*", {"efficientformer_l1"}),
    ("vim*", {"vim_tiny", "vim_small"}),
])
def test_registered_names(pattern, names):
    assert set(vitkit.list_models(pattern)) == names


@pytest.mark.parametrize("name", ["test_levit", "test_mobilevit", "test_efficientformer", "test_vim"])
def test_one_training_step_changes_every_parameter(name):
    from vitkit.objectives import Supervised

    model = vitkit.create_model(name, num_classes=4, drop_path_rate=0.1).train()
    objective = Supervised(model, num_classes=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = objective({"image": torch.randn(8, 3, 32, 32), "label": torch.randint(0, 4, (8,))})
    out["loss"].backward()
    opt.step()
    assert torch.isfinite(out["loss"])
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not change"


def test_trains_through_the_cli(tmp_path):
    # LeViT's two heads return a tuple in training: the CLI path (objective, EMA, eval) must take it.
    from vitkit.cli.main import main

    args = [
        "train", "--model", "test_levit", "--data", "shapes:64", "data.img_size=32", "engine.epochs=1",
        "data.batch_size=16", "engine.max_steps=2", "data.num_workers=0", "engine.tensorboard=false",
        "engine.plots=false", "engine.amp=none", "data.auto_augment=null", "--out", str(tmp_path / "run"),
    ]
    assert main(args) == 0
    assert (tmp_path / "run" / "summary.json").exists()


def test_models_command_lists_the_families(capsys):
    from vitkit.cli.main import main

    for pattern in ("levit_128s", "mobilevit_xxs", "efficientformer_l1", "vim_tiny"):
        assert main(["models", pattern]) == 0
        line = capsys.readouterr().out.splitlines()[1]
        assert line.startswith(pattern) and float(line.split()[-1]) > 0  # GFLOPs counted on the meta device
