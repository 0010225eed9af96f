"""The detector registry: detectors by name (``model.head=<name>``) over any vitkit backbone.

A detector class is built as ``cls(backbone, num_classes, **detector_args)`` where ``backbone``
is a registry name or a built module; :func:`create_detector` is the one way to build one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import ConfigError

# The modules that register the built-in detectors, imported on first lookup so that importing
# vitkit stays cheap.
_DETECTOR_MODULES = ("detr", "deformable_detr", "yolos", "vitdet_det")


@dataclass(frozen=True)
class DetectorEntry:
    name: str
    cls: type
    default_backbone: str


_REGISTRY: dict[str, DetectorEntry] = {}
_loaded = False


def register_detector(name: str, default_backbone: str):
    """Class decorator: make a detector buildable as ``model.head=<name>``; ``default_backbone``
    is the backbone it uses when none is named (the paper's)."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"detector {name!r} is already registered by {_REGISTRY[name].cls.__name__}")
        _REGISTRY[name] = DetectorEntry(name, cls, default_backbone)
        cls.detector_name = name
        return cls

    return deco


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _DETECTOR_MODULES:
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{mod}":  # a module that exists but fails to import is a bug
                raise


def list_detectors() -> list[str]:
    """The registered detector names, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def detector_entry(name: str) -> DetectorEntry:
    """The entry of detector ``name``; an unknown name is a ConfigError listing the known ones."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown detector {name!r}: choose model.head from {', '.join(list_detectors())}")
    return _REGISTRY[name]


def create_detector(name: str, backbone=None, *, num_classes: int, **detector_args):
    """Build detector ``name`` on ``backbone`` (a registry name or module; None: the detector's default)
    for ``num_classes`` object classes (no background class: "no object" is the detector's own)."""
    entry = detector_entry(name)
    if num_classes < 1:
        raise ConfigError(f"a detector needs at least one object class, got num_classes={num_classes}")
    return entry.cls(backbone if backbone is not None else entry.default_backbone, num_classes, **detector_args)
