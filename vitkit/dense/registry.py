"""The dense-head registry: heads by name (``model.head=<name>``), each with the tasks it serves.

A head is an ``nn.Module`` built as ``cls(backbone, out_chans, **head_args)`` whose
``forward(backbone, x)`` returns a (B, out_chans, h, w) map at any stride; it reads the backbone
only through its public API (``forward_intermediates``, ``feature_info``, ``pyramid_info``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import ConfigError

# The modules that register the built-in heads, imported on first lookup so that importing
# vitkit stays cheap and a head module may import the backbone families it needs.
_HEAD_MODULES = ("linear", "setr", "segmenter", "upernet", "dpt", "vit_adapter")


@dataclass(frozen=True)
class HeadEntry:
    name: str
    cls: type
    tasks: tuple[str, ...]


_REGISTRY: dict[str, HeadEntry] = {}
_loaded = False


def register_head(name: str, tasks: tuple[str, ...] = ("segment", "depth")):
    """Class decorator: make a dense head buildable as ``model.head=<name>`` for ``tasks``."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"dense head {name!r} is already registered by {_REGISTRY[name].cls.__name__}")
        _REGISTRY[name] = HeadEntry(name, cls, tuple(tasks))
        cls.head_name = name
        return cls

    return deco


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _HEAD_MODULES:
        try:
            importlib.import_module(f"{__package__}.heads.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.heads.{mod}":
                raise


def list_heads(task: str | None = None) -> list[str]:
    """Registered head names, those serving ``task`` when given."""
    _load_builtin()
    return sorted(n for n, e in _REGISTRY.items() if task is None or task in e.tasks)


def head_entry(name: str, task: str | None = None) -> HeadEntry:
    """The registered head ``name``; a ConfigError names the choices when it is unknown or does not serve ``task``."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown dense head {name!r}: model.head must be one of {list_heads(task)}")
    entry = _REGISTRY[name]
    if task is not None and task not in entry.tasks:
        raise ConfigError(
            f"dense head {name!r} does not serve task {task!r} (it serves {', '.join(entry.tasks)}); "
            f"heads for {task}: {list_heads(task)}"
        )
    return entry
