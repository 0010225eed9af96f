"""Generative models by name: ``create_generator("maskgit_nano")``, ``list_generators("var")``.

Every model family (the VQ tokenizer, MaskGIT, VAR, DiT) registers its variants when its module
is imported: a name, a kind (``"tokenizer"``, ``"maskgit"``, ``"var"``, ``"dit"``), the class and
the constructor arguments of that variant. A built model records its name and the full arguments
it was built with as ``model.model_name`` / ``model.model_args``, so
``create_generator(m.model_name, **m.model_args)`` rebuilds the same architecture (this is what
``vitkit.weights_io.save_weights`` stores beside the weights).
"""

from __future__ import annotations

import copy
import difflib
import inspect
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError

KINDS = ("tokenizer", "maskgit", "var", "dit")


@dataclass(frozen=True)
class _Entry:
    name: str
    kind: str
    cls: type
    defaults: dict


_GENERATORS: dict[str, _Entry] = {}


def register_generator(name: str, kind: str, cls: type, defaults: dict) -> None:
    """Make ``create_generator(name)`` build ``cls(**defaults)`` (a model of ``kind``)."""
    if kind not in KINDS:
        raise ValueError(f"generator {name!r}: kind {kind!r} is not one of {KINDS}")
    if name in _GENERATORS and _GENERATORS[name].cls is not cls:
        raise ValueError(f"generator {name!r} is already registered by {_GENERATORS[name].cls.__name__}")
    _GENERATORS[name] = _Entry(name, kind, cls, copy.deepcopy(dict(defaults)))


def list_generators(kind: str | None = None) -> list[str]:
    """Registered generator names (of one ``kind`` when given), sorted."""
    return sorted(n for n, e in _GENERATORS.items() if kind is None or e.kind == kind)


def _entry(name: str) -> _Entry:
    if name not in _GENERATORS:
        close = difflib.get_close_matches(name, list(_GENERATORS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown generative model {name!r}{hint} (registered: {', '.join(list_generators()) or 'none'})"
        )
    return _GENERATORS[name]


def generator_kind(name: str) -> str:
    """The kind (``"tokenizer"``, ``"maskgit"``, ``"var"``, ``"dit"``) of registered model ``name``."""
    return _entry(name).kind


def _accepted(cls: type) -> set[str] | None:
    """The keyword arguments ``cls`` accepts, or None when it takes ``**kwargs``."""
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.name != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL}


def create_generator(name: str, **overrides) -> nn.Module:
    """Build registered model ``name`` with any constructor argument overridden, freshly initialised."""
    entry = _entry(name)
    accepted = _accepted(entry.cls)
    if accepted is not None:
        unknown = sorted(set(overrides) - accepted)
        if unknown:
            raise ConfigError(
                f"unknown argument(s) {unknown} for generative model {name!r}; "
                f"{entry.cls.__name__} takes: {', '.join(sorted(accepted))}"
            )
    args = {**copy.deepcopy(entry.defaults), **overrides}
    try:
        model = entry.cls(**args)
    except TypeError as e:
        raise ConfigError(f"bad arguments for generative model {name!r}: {e}") from None
    model.model_name = name
    model.model_args = args
    return model


__all__ = ["KINDS", "create_generator", "generator_kind", "list_generators", "register_generator"]
