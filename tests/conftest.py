import os

import pytest
import torch
from helpers import require_peer

from vitkit._peers import ensure_torchvision_importable

# Tests are CPU-only and must stay quick on 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ensure_torchvision_importable()

_HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_runtest_setup(item):
    # @pytest.mark.peer("timm", ...): the test needs those peers (a failure in CI, a skip elsewhere).
    for mark in item.iter_markers("peer"):
        for name in mark.args:
            require_peer(name)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache in tmp_path, offline; returns a function that adds a repo snapshot."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment at import; the module constants are what it uses.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def add(repo_id: str):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(_HUB_COMMIT)
        snapshot = repo / "snapshots" / _HUB_COMMIT
        snapshot.mkdir(parents=True)
        return snapshot

    return add
