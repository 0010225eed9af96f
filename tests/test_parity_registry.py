"""Parity with timm for every model name both libraries register.

For each shared name both models are built on the meta device (no memory, no init cost) with
the same class count: the parameter counts must be equal, and so must ``num_features``,
and ``num_classes`` (together they fix the output shape). For the
smallest variant of each vitkit family, both are built for real at full depth with random
weights: timm's state dict goes through ``load_weights`` (strict), and the logits (and so the
output shapes) must agree.

``test_*`` names are each library's own tiny test models, which share a name but not a
configuration, so they are not compared. Some timm variants default to no classifier
(``num_classes=0``, for weights published without one) where vitkit keeps 1000 classes; the
class count is therefore passed to both.
"""

from __future__ import annotations

import pytest
import torch
from helpers import lazy_peer, max_diff, perturb

import vitkit
from vitkit import load_weights
from vitkit._peers import import_peer

timm = lazy_peer("timm")
pytestmark = pytest.mark.peer("timm")

ATOL = 1e-4
# Known, explained differences in parameter count (name -> reason); none today.
KNOWN_PARAM_DIFFS: dict[str, str] = {}
# family -> (img_size passed to both constructors, input side) for the logits check. Small
# inputs keep the file fast; Swin's windows and EfficientFormer's last-stage attention biases
# are sized for 224 px in timm, so those two run at their registered size.
LOGITS_AT = {
    "cait": (64, 64), "convit": (64, 64), "levit": (64, 64), "mixer": (64, 64), "vit": (64, 64),
    "vit_hybrid": (64, 64), "convnext": (None, 64), "mobilevit": (None, 64), "pvt_v2": (None, 64),
    "resnet": (None, 64), "efficientformer": (None, 224), "swin": (None, 224),
}


def _shared_names() -> list[str]:
    try:
        peer = import_peer("timm")
    except ImportError:
        peer = None
    if peer is None:  # one case, which the peer mark fails (in CI) or skips with the reason
        return ["timm-not-importable"]
    return sorted(n for n in set(vitkit.list_models()) & set(peer.list_models()) if not n.startswith("test_"))


SHARED = _shared_names()


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_PARAM_DIFFS[n], strict=True))
                                  if n in KNOWN_PARAM_DIFFS else n for n in SHARED])
def test_same_parameter_count_and_output_on_meta(name):
    num_classes = vitkit.get_model_card(name).num_classes
    with torch.device("meta"):
        ours = vitkit.create_model(name, num_classes=num_classes)
        theirs = timm.create_model(name, pretrained=False, num_classes=num_classes)
    assert _n_params(ours) == _n_params(theirs), (_n_params(ours), _n_params(theirs))
    assert (ours.num_features, ours.num_classes) == (theirs.num_features, theirs.num_classes)


def _smallest_per_family() -> list[str]:
    if SHARED == ["timm-not-importable"]:
        return SHARED
    best: dict[str, tuple[int, str]] = {}
    for name in SHARED:
        with torch.device("meta"):
            n = _n_params(vitkit.create_model(name))
        family = vitkit.get_model_card(name).family
        if family not in best or n < best[family][0]:
            best[family] = (n, name)
    return sorted(name for _, name in best.values())


@pytest.mark.parametrize("name", _smallest_per_family())
def test_logits_match_on_random_weights(name):
    family = vitkit.get_model_card(name).family
    img_size, side = LOGITS_AT[family]
    kw = {} if img_size is None else {"img_size": img_size}
    ours = vitkit.create_model(name, **kw).eval()
    theirs = perturb(timm.create_model(name, pretrained=False, **kw), scale=0.02)
    report = load_weights(ours, theirs.state_dict(), verbose=False)
    assert not report.dropped and not report.resampled, report
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(ours(x), theirs(x)) <= ATOL
