"""Peers (timm, transformers, onnxruntime) cannot hide a failure: "not installed" and "installed
but broken" are told apart, and in CI both fail the tests that need the peer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
from helpers import require_peer

from vitkit._peers import import_peer

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """Packages on sys.path: one that raises on import, one whose own dependency is missing."""
    (tmp_path / "vk_broken_peer").mkdir()
    (tmp_path / "vk_broken_peer" / "__init__.py").write_text("raise RuntimeError('the C extension failed to load')\n")
    (tmp_path / "vk_needs_dep").mkdir()
    (tmp_path / "vk_needs_dep" / "__init__.py").write_text("import vk_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("vk_broken_peer", "vk_needs_dep"):
        sys.modules.pop(name, None)


def test_a_missing_peer_is_none():
    assert import_peer("vk_not_installed_anywhere") is None
    assert import_peer("vk_not_installed_anywhere.sub") is None


def test_a_broken_peer_raises_with_the_original_error(fake_packages):
    with pytest.raises(ImportError, match="the C extension failed to load") as info:
        import_peer("vk_broken_peer")
    assert "installed but cannot be imported" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    # A dependency of the peer missing is a broken peer, not a missing one.
    with pytest.raises(ImportError, match="vk_missing_dependency"):
        import_peer("vk_needs_dep")


def test_require_peer_fails_in_ci_and_skips_elsewhere_with_the_reason(fake_packages, monkeypatch):
    monkeypatch.setattr(helpers, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="the C extension failed to load"):
        require_peer("vk_broken_peer")
    with pytest.raises(pytest.fail.Exception, match="vk_not_installed_anywhere is not installed"):
        require_peer("vk_not_installed_anywhere")
    monkeypatch.setattr(helpers, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="the C extension failed to load"):
        require_peer("vk_broken_peer")
    assert require_peer("json").dumps([1]) == "[1]"


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_broken_timm_fails_a_parity_test_in_ci(tmp_path, ci):
    """A shadow ``timm`` that raises on import: with CI=true the parity test fails naming the error;
    without, it skips and says why. Only that test's outcome changes: collection still succeeds."""
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "__init__.py").write_text("raise OSError('libtorchvision.so: undefined symbol _ZN3c10')\n")
    env = {**os.environ, "CI": ci, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         f"{TESTS / 'test_parity.py'}::test_timm_deit_distilled"],
        capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=240,
    )
    out = r.stdout + r.stderr
    assert "libtorchvision.so: undefined symbol" in out, out[-3000:]
    if ci:
        # The peer mark fails the test at setup: pytest counts an error, and exits 1.
        assert r.returncode == 1 and ("1 failed" in out or "1 error" in out), out[-3000:]
    else:
        assert r.returncode == 0 and "1 skipped" in out, out[-3000:]
