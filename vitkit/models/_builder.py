"""create_model: variant name (or a saved weights file) -> a ready model."""

from __future__ import annotations

import json
import os
from dataclasses import replace

from torch import nn

from ..convert.weights import load_weights
from ..errors import ConfigError, PathNotFoundError, WeightsError
from ..weights_io import read_metadata
from ._registry import get_model_card, get_model_fn


def create_model(
    name: str,
    pretrained: bool | str = False,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    in_chans: int | None = None,
    **overrides,
) -> nn.Module:
    """Build a registered variant.

    Args:
        name: a registered name (see ``list_models()``) or the path of a file written by
            ``save_weights``, which is rebuilt from the config stored in it.
        pretrained: True loads the card's hub checkpoint; a path or hub id loads that.
        num_classes / img_size / in_chans: override the card (the head, the position
            embedding grid and the patch projection adapt when pretrained weights load).
        overrides: any other constructor argument (``drop_path_rate=0.1``, ``global_pool="avg"``...).
    """
    if os.path.exists(name):
        return model_from_file(name, num_classes=num_classes, img_size=img_size, in_chans=in_chans, **overrides)
    if _looks_like_path(name):
        raise PathNotFoundError(
            f"no such file or folder: {name!r}. create_model takes a registered name (see `vitkit models`) "
            "or the path of a .safetensors file written by vitkit"
        )
    card = get_model_card(name)
    kwargs = dict(card.config)
    kwargs.update(overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    kwargs.setdefault("num_classes", card.num_classes)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    model = get_model_fn(name)(**kwargs)
    size = kwargs.get("img_size", card.input_size[1:])
    size = (size, size) if isinstance(size, int) else tuple(size)
    chans = kwargs.get("in_chans", 3)
    mean, std = card.mean, card.std
    if chans != len(mean):
        # Folded RGB weights see the mean of the RGB statistics per channel.
        mean, std = (sum(mean) / len(mean),) * chans, (sum(std) / len(std),) * chans
    model.card = replace(card, input_size=(chans, *size), num_classes=kwargs["num_classes"], mean=mean, std=std)
    model.model_name = name
    model.model_args = kwargs
    if pretrained:
        source = card.hub_id if pretrained is True else pretrained
        if source is None:
            raise ConfigError(f"model {name!r} has no published weights; pass pretrained=<path or hub id>")
        load_weights(model, source)
    return model


def _looks_like_path(name: str) -> bool:
    """Registered names are bare identifiers; a separator or a file suffix means a path was meant."""
    return any(c in name for c in "/\\") or os.path.splitext(name)[1] != ""


def model_from_file(
    path: str | os.PathLike,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    in_chans: int | None = None,
    **overrides,
) -> nn.Module:
    """Rebuild the model saved by ``save_weights`` and load its weights.

    Overrides change the architecture before loading; the weights adapt (a new ``img_size``
    resamples the position embedding, a new ``num_classes`` starts a fresh head).
    """
    meta = read_metadata(path)
    if not meta.get("model_name"):
        raise WeightsError(
            f"{path} has no vitkit metadata (it was not written by save_weights); build the model with "
            "vitkit.create_model(name) and call vitkit.load_weights(model, path)"
        )
    args = json.loads(meta.get("model_args", "{}"))
    args.update(overrides)
    for key, value in (("num_classes", num_classes), ("img_size", img_size), ("in_chans", in_chans)):
        if value is not None:
            args[key] = value
    model = create_model(meta["model_name"], **args)
    load_weights(model, path, verbose=False)
    saved_card = json.loads(meta.get("card", "{}"))
    labels = tuple(saved_card.get("labels") or ())
    if labels and len(labels) == model.num_classes:
        # Class names and the normalisation the weights were trained with travel with them.
        keep = {k: tuple(saved_card[k]) for k in ("mean", "std") if len(saved_card.get(k) or ()) == model.in_chans}
        model.card = replace(model.card, labels=labels, **keep)
    return model
