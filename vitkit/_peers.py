"""Importing peer libraries (timm, transformers, open_clip, lightly, torchmetrics, onnxruntime) for parity tests and
benchmarks.

vitkit itself never needs torchvision. The peers do, and the PyPI torchvision wheel
is a CUDA build whose C extension cannot load against a CPU-only torch; the import
then dies on the missing ``torchvision::nms`` schema. Declaring the two op schemas
before the import lets the pure-Python parts (models, transforms) load.
"""

from __future__ import annotations

import importlib
import sys

import torch

_LIB = None


def ensure_torchvision_importable() -> bool:
    """Return True when torchvision imports (after patching if needed)."""
    global _LIB
    try:
        import torchvision  # noqa: F401

        return True
    except ImportError:
        return False
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401

    return True


def import_peer(name: str):
    """Import a peer library (``timm``, ``transformers``, ``lightly``, ``onnxruntime``, or one of their modules).

    Returns None only when the peer is not installed: its top-level package is missing. A peer
    that is installed but fails to import (a broken install, a missing dependency of its own, an
    API that moved) raises ImportError carrying the original error, so nobody mistakes a broken
    environment for an absent optional package.
    """
    top = name.split(".")[0]
    try:
        if top in ("timm", "transformers", "open_clip", "lightly", "torchmetrics", "peft", "segment_anything"):
            # each imports torchvision
            ensure_torchvision_importable()
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == top:
            return None
        raise ImportError(f"{name} is installed but cannot be imported: {type(e).__name__}: {e}") from e
    except Exception as e:
        raise ImportError(f"{name} is installed but cannot be imported: {type(e).__name__}: {e}") from e
