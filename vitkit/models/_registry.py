"""Model registry: variant name -> constructor and model card."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ModelCard:
    """What a user needs to know to use a variant: sizes, preprocessing, provenance."""

    name: str
    family: str
    input_size: tuple[int, int, int] = (3, 224, 224)
    num_classes: int = 1000
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    paper: str = ""
    hub_id: str | None = None
    hub_filename: str = "model.safetensors"
    notes: str = ""
    labels: tuple[str, ...] = ()  # class names, set when a model is trained or loaded with them
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Entry:
    fn: Callable
    card: ModelCard


_MODELS: dict[str, _Entry] = {}


def register_model(card: ModelCard):
    """Register a variant function under ``card.name``."""

    def wrap(fn: Callable) -> Callable:
        if card.name in _MODELS:
            raise ValueError(f"model {card.name!r} is registered twice")
        _MODELS[card.name] = _Entry(fn, card)
        return fn

    return wrap


def register_family(family: str, build: Callable, **card_defaults) -> Callable[..., None]:
    """A function that registers variants of one family: ``register(name, config, img=224, **card)``.

    Each variant builds as ``build(**config, img_size=img)`` (plus the caller's overrides) and
    gets a card for ``img`` px inputs; ``card_defaults`` (e.g. ``paper``) apply where the
    variant does not set them.
    """

    def register(name: str, config: dict, img: int = 224, **card) -> None:
        card = {"family": family, **card_defaults, **card}
        chans = config.get("in_chans", 3)
        register_model(ModelCard(name=name, input_size=(chans, img, img), config=dict(config, img_size=img), **card))(
            lambda **kwargs: build(**kwargs)
        )

    return register


def list_models(pattern: str = "*") -> list[str]:
    """Registered variant names matching a shell-style pattern, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def get_model_card(name: str) -> ModelCard:
    return _lookup(name).card


def get_model_fn(name: str) -> Callable:
    return _lookup(name).fn


def _lookup(name: str) -> _Entry:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint} (see vitkit.list_models() or `vitkit models`)")
    return _MODELS[name]
