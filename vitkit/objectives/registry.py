"""The objective registry: objectives by name, each with the dataclass of its config keys."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError


@dataclass
class ObjectiveEntry:
    name: str
    cls: type
    config_cls: type


_REGISTRY: dict[str, ObjectiveEntry] = {}


def register_objective(name: str, config_cls: type):
    """Class decorator: make an :class:`Objective` buildable as ``objective.name=<name>``.

    ``config_cls`` is a dataclass of the objective's ``objective.*`` keys; the class builds
    itself with ``from_config(model, cfg, **run_context)``.
    """

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"objective {name!r} is already registered by {_REGISTRY[name].cls.__name__}")
        _REGISTRY[name] = ObjectiveEntry(name, cls, config_cls)
        cls.registered_name = name
        return cls

    return deco


def list_objectives() -> list[str]:
    return sorted(_REGISTRY)


def objective_entry(name: str) -> ObjectiveEntry:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown objective {name!r}: objective.name must be one of {list_objectives()}")
    return _REGISTRY[name]


def objective_keys(name: str) -> dict[str, object]:
    """The config keys of objective ``name`` with their defaults."""
    cfg = objective_entry(name).config_cls()
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def objective_config(section: dict):
    """Validate an ``objective:`` config section ``{"name": ..., key: value}`` -> (name, config dataclass)."""
    section = dict(section)
    name = section.pop("name", "supervised")
    entry = objective_entry(name)
    known = objective_keys(name)
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} for objective {name!r}: its keys are "
            f"{', '.join(f'objective.{k}' for k in known) or '(none)'}"
        )
    for key, value in section.items():
        _check_type(name, key, value, known[key], entry.config_cls)
    try:
        return name, entry.config_cls(**section)
    except TypeError as e:
        raise ConfigError(f"bad objective.* value for objective {name!r}: {e}") from None


def _check_type(objective: str, key: str, value, default, config_cls) -> None:
    """A value of the wrong kind for its key (text for a number, a number for a flag) is a ConfigError
    here, before it fails deep inside a training step. Only keys annotated as one plain type (``float``,
    ``int``, ``bool``, ``str``, each optionally ``| None``) are checked; the others take what they get."""
    ann = str(next(f.type for f in dataclasses.fields(config_cls) if f.name == key)).replace(" ", "")
    base = ann.removesuffix("|None")
    if value is None:
        ok, kind = default is None or ann != base, f"a {base}"
    elif base == "bool":
        ok, kind = isinstance(value, bool), "true or false"
    elif base in ("float", "int"):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif base == "str":
        ok, kind = isinstance(value, str), "text"
    else:
        ok, kind = True, ""
    if not ok:
        raise ConfigError(f"objective.{key}={value!r} for objective {objective!r}: expected {kind} "
                          f"(its default is {default!r})")


def build_objective(name: str, model: nn.Module, cfg=None, **context) -> nn.Module:
    """Build registered objective ``name`` around ``model``.

    ``cfg`` is its config dataclass or a dict of its keys (None: defaults); ``context`` carries
    what the run knows (``num_classes``, ``label_smoothing``, ...), each objective takes what it needs.
    """
    entry = objective_entry(name)
    if cfg is None or isinstance(cfg, dict):
        _, cfg = objective_config({"name": name, **(cfg or {})})
    return entry.cls.from_config(model, cfg, **context)


def describe_objectives() -> str:
    """A comment block listing every registered objective's keys (for ``--show-config``)."""
    lines = ["# objectives (objective.name=<name>, then that objective's keys):"]
    for name in list_objectives():
        keys = ", ".join(f"{k}={v}" for k, v in objective_keys(name).items()) or "(no keys)"
        lines.append(f"#   {name}: {keys}")
    return "\n".join(lines)
