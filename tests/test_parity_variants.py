"""Parity with timm for the non-ViT families: random timm weights load strictly and give the same logits.

Each case builds the real timm variant (at a reduced image size where the model allows it),
perturbs every parameter and BatchNorm statistic so each one matters, loads the timm state dict
through ``load_weights`` (strict) into the vitkit model of the same name, and compares float32
logits and features in eval mode.
"""

from __future__ import annotations

import pytest
import torch
from helpers import lazy_peer
from helpers import max_diff as _max_diff
from helpers import perturb as _randomise

import vitkit
from vitkit import load_weights

timm = lazy_peer("timm")
pytestmark = pytest.mark.peer("timm")

ATOL = 1e-5

# name -> constructor overrides for both libraries. Models with a position embedding or
# token-mixing weights are built at 64 px; convolutional ones take 64 px as is. The smallest
# variant of each family runs at full depth; the larger ones keep their width and heads with
# fewer blocks (every block is the same module), so the file stays fast on 2 cores.
_AT_64 = {"img_size": 64}
CASES = {
    "resnet18": {},
    "resnet50": {"layers": (1, 1, 2, 1)},
    "convnext_atto": {},  # MLP as 1x1 convs on NCHW maps
    "convnext_tiny": {"depths": (1, 1, 2, 1)},  # MLP as linears on NHWC tokens
    "convnextv2_atto": {},
    "convnextv2_tiny": {"depths": (1, 1, 2, 1)},
    "cait_xxs24_224": _AT_64,
    "cait_s24_224": {**_AT_64, "depth": 4},
    "convit_tiny": _AT_64,
    "convit_small": {**_AT_64, "depth": 4, "local_up_to_layer": 2},
    "mixer_s16_224": _AT_64,
    "mixer_b16_224": _AT_64,
    "vit_small_r26_s32_224": _AT_64,
}


@pytest.mark.parametrize("name", list(CASES))
def test_timm_parity(name):
    kwargs = CASES[name]
    peer = _randomise(timm.create_model(name, pretrained=False, **kwargs))
    ours = vitkit.create_model(name, **kwargs).eval()
    report = load_weights(ours, peer.state_dict(), verbose=False)
    assert report.format == "timm" and not report.dropped and not report.resampled and not report.missing
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(ours.forward_features(x), peer.forward_features(x)) <= ATOL
        assert _max_diff(ours(x), peer(x)) <= ATOL
        # In float64 the two compute the same function up to rounding: the mapping is exact.
        assert _max_diff(ours.double()(x.double()), peer.double()(x.double())) <= 1e-9


def test_timm_parity_other_class_count_and_features():
    """A 10-class peer and the features-only path (num_classes=0) agree too."""
    peer = _randomise(timm.create_model("convnext_atto", pretrained=False, num_classes=10))
    ours = vitkit.create_model("convnext_atto", num_classes=10).eval()
    load_weights(ours, peer.state_dict(), verbose=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(ours(x), peer(x)) <= ATOL
        assert _max_diff(ours.forward_head(ours.forward_features(x), pre_logits=True),
                         peer.forward_head(peer.forward_features(x), pre_logits=True)) <= ATOL


@pytest.mark.parametrize("name", ["resnet18", "convit_small", "cait_s24_224"])
def test_timm_intermediates_parity(name):
    """Multi-scale features match timm's ``forward_intermediates`` point by point."""
    kwargs = CASES[name]
    peer = _randomise(timm.create_model(name, pretrained=False, **kwargs))
    ours = vitkit.create_model(name, **kwargs).eval()
    load_weights(ours, peer.state_dict(), verbose=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, theirs = peer.forward_intermediates(x, indices=3)
        _, mine = ours.forward_intermediates(x, indices=3)
    assert len(mine) == len(theirs) == 3
    for a, b in zip(mine, theirs):
        # Un-normalised residual streams reach |x| ~ 50, where 1e-5 is a few float32 ulps: the bound
        # is 1e-4 absolute (2e-6 of the scale); the logits above are held to 1e-5.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_pretrained_into_another_class_count(name):
    """ImageNet weights into a 10-class model: the classifier (``fc`` / ``head.fc``) restarts, the rest loads."""
    peer = _randomise(timm.create_model(name, pretrained=False))
    ours = vitkit.create_model(name, num_classes=10).eval()
    report = load_weights(ours, peer.state_dict(), verbose=False)
    assert any("1000 classes, model has 10" in d for d in report.dropped)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        mine = ours.forward_head(ours.forward_features(x), pre_logits=True)
        theirs = peer.forward_head(peer.forward_features(x), pre_logits=True)
        assert _max_diff(mine, theirs) <= ATOL  # ConvNeXt's head norm is part of the loaded weights
