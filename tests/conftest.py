import os

import pytest
import torch

from vitkit._peers import ensure_torchvision_importable

# Tests are CPU-only and must stay quick on 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ensure_torchvision_importable()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
