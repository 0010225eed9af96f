"""Parity with timm for every model name both libraries register.

For each shared name both models are built on the meta device (no memory, no init cost): the
parameter count must be equal, and so must the output shape (a meta forward where both models
allow one, else ``num_features`` and ``num_classes``). For the smallest variant of each vitkit
family, both are built for real at full depth with random weights: timm's state dict goes
through ``load_weights`` (strict) and the logits must agree.
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
# Families whose smallest variant cannot run at a reduced input size (the size is fixed by the
# architecture), so its logits are compared at the registered size.
SMALL_INPUT = 64


def _shared_names() -> list[str]:
    try:
        peer = import_peer("timm")
    except ImportError:
        peer = None
    if peer is None:  # one case, which the peer mark fails (in CI) or skips with the reason
        return ["timm-not-importable"]
    return sorted(set(vitkit.list_models()) & set(peer.list_models()))


SHARED = _shared_names()


def _meta_pair(name: str):
    with torch.device("meta"):
        ours = vitkit.create_model(name)
        theirs = timm.create_model(name, pretrained=False)
    return ours.eval(), theirs.eval()


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_output(model: torch.nn.Module, size) -> tuple[int, ...] | None:
    try:
        with torch.no_grad():
            return tuple(model(torch.empty(2, *size, device="meta")).shape)
    except Exception:  # some ops read tensor values, which the meta device has not got
        return None


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_PARAM_DIFFS[n], strict=True))
                                  if n in KNOWN_PARAM_DIFFS else n for n in SHARED])
def test_same_parameter_count_and_output_on_meta(name):
    ours, theirs = _meta_pair(name)
    assert _n_params(ours) == _n_params(theirs), (_n_params(ours), _n_params(theirs))
    size = vitkit.get_model_card(name).input_size
    a, b = _meta_output(ours, size), _meta_output(theirs, size)
    if a is not None and b is not None:
        assert a == b
    else:
        assert ours.num_features == theirs.num_features and ours.num_classes == theirs.num_classes


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


def _build_small(name: str):
    """Both models at SMALL_INPUT where the architecture accepts another size, else as registered."""
    torch.manual_seed(0)
    try:
        ours = vitkit.create_model(name, img_size=SMALL_INPUT)
        theirs = timm.create_model(name, pretrained=False, img_size=SMALL_INPUT)
        size = SMALL_INPUT
    except (TypeError, ValueError, AssertionError, RuntimeError):
        ours, theirs = vitkit.create_model(name), timm.create_model(name, pretrained=False)
        size = vitkit.get_model_card(name).input_size[-1]
    return ours, theirs, size


@pytest.mark.parametrize("name", _smallest_per_family())
def test_logits_match_on_random_weights(name):
    ours, theirs, size = _build_small(name)
    perturb(theirs, scale=0.02)
    report = load_weights(ours, theirs.state_dict(), verbose=False)
    assert not report.dropped and not report.resampled, report
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(ours.eval()(x), theirs(x)) <= ATOL
