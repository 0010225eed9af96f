"""Two-tower variants by name: ``create_clip("clip_vit_b16")``, ``list_clip_models()``, and
``load_clip(path)`` for saved models.

A variant is a function returning the :class:`~vitkit.clip.model.TwoTower` ``model_args`` it
stands for, registered with :func:`register_clip`. ``create_clip`` applies overrides to that dict
and builds it, so every model can be rebuilt from what ``model_args`` records.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import importlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import ConfigError, PathNotFoundError, WeightsError
from ..rundir import WEIGHTS, RunDir
from ..weights_io import read_metadata, read_state_dict
from .model import (
    MODEL_ARG_KEYS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    TwoTower,
    build_two_tower,
    with_card,
)

CLIP_PAPER = "Learning Transferable Visual Models From Natural Language Supervision (Radford et al., 2021)"
SIGLIP_PAPER = "Sigmoid Loss for Language Image Pre-Training (Zhai et al., 2023)"


@dataclass(frozen=True)
class _Entry:
    fn: Callable[[], dict]
    paper: str
    notes: str


_CLIP_MODELS: dict[str, _Entry] = {}


def register_clip(name: str, *, paper: str = "", notes: str = ""):
    """Decorator: register a function returning a two-tower ``model_args`` dict as variant ``name``."""

    def deco(fn: Callable[[], dict]) -> Callable[[], dict]:
        if name in _CLIP_MODELS:
            raise ValueError(f"two-tower model {name!r} is registered twice")
        _CLIP_MODELS[name] = _Entry(fn, paper, notes)
        return fn

    return deco


def list_clip_models(pattern: str = "*") -> list[str]:
    """Registered two-tower variant names matching a shell-style pattern, sorted."""
    return sorted(n for n in _CLIP_MODELS if fnmatch.fnmatch(n, pattern))


def clip_model_args(name: str) -> dict:
    """The ``model_args`` of registered variant ``name`` (a fresh copy)."""
    if name not in _CLIP_MODELS:
        close = difflib.get_close_matches(name, list(_CLIP_MODELS), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown two-tower model {name!r}{hint} (choose from {', '.join(list_clip_models())})")
    return dict(copy.deepcopy(_CLIP_MODELS[name].fn()), name=name)


# Shortcuts for the overrides people reach for most; each names a key inside a tower's spec.
_SHORTCUTS = {"img_size": ("image", "img_size"), "context_length": ("text", "context_length"),
              "vocab_size": ("text", "vocab_size")}


def _fit_text_to_tokenizer(args: dict, keep_vocab: bool) -> None:
    """A text tower for another tokenizer: its vocabulary size, and pooling at its end-of-text id when
    that is not the largest id (CLIP's argmax pooling finds the end only with CLIP's BPE)."""
    from .model import _tokenizer_for

    tok = _tokenizer_for(json.dumps(args["tokenizer"], sort_keys=True))
    text = args["text"]
    if not keep_vocab:
        text["vocab_size"] = tok.vocab_size
    if text.get("pool", "argmax") == "argmax" and tok.eot_id != tok.vocab_size - 1:
        text.update(pool="eot", eot_id=tok.eot_id)


def apply_overrides(args: dict, overrides: dict) -> dict:
    """``args`` with ``overrides``: top-level keys replace; ``image`` / ``text`` dicts merge into the
    towers' specs (an ``image`` naming another ``model`` replaces the image spec); ``img_size``,
    ``context_length`` and ``vocab_size`` set those tower arguments. A ``tokenizer`` (a vitkit
    tokenizer or its ``to_config()``) fits the text tower to it: its vocabulary size (unless
    ``vocab_size`` is given) and, when its end-of-text id is not its largest, pooling at that id."""
    args = copy.deepcopy(args)
    valid = sorted(set(MODEL_ARG_KEYS) - {"name"} | set(_SHORTCUTS))
    for key, value in overrides.items():
        if key in _SHORTCUTS:
            tower, arg = _SHORTCUTS[key]
            args[tower][arg] = value
            if key == "context_length" and isinstance(args.get("tokenizer"), dict):
                args["tokenizer"] = {**args["tokenizer"], "context_length": value}
        elif key in ("image", "text"):
            if not isinstance(value, dict):
                raise ConfigError(f"override {key}= must be a dict of {key} tower arguments, got {value!r}")
            if key == "image" and value.get("model", args["image"].get("model")) != args["image"].get("model"):
                args["image"] = dict(value)
            else:
                args[key] = {**args[key], **value}
        elif key == "tokenizer":
            args[key] = value.to_config() if hasattr(value, "to_config") else value
            if args[key] is not None:
                _fit_text_to_tokenizer(args, keep_vocab="vocab_size" in overrides)
        elif key in MODEL_ARG_KEYS and key != "name":
            args[key] = value
        else:
            raise ConfigError(f"unknown two-tower override {key!r}; valid: {', '.join(valid)}")
    return args


def create_clip(name: str | os.PathLike, *, pretrained: str | os.PathLike | None = None, **overrides) -> TwoTower:
    """Build two-tower variant ``name`` (see :func:`list_clip_models`), or rebuild a saved one from its path.

    Args:
        pretrained: weights to load into the built model: a vitkit two-tower file or run
            directory, or (through ``vitkit.clip.load``) an open_clip / transformers checkpoint.
        overrides: ``embed_dim``, ``init_logit_scale``, ``tokenizer``, ... replace the variant's
            values; ``image={...}`` / ``text={...}`` change tower arguments; ``img_size``,
            ``context_length`` and ``vocab_size`` are shortcuts for the common ones.
    """
    if not isinstance(name, str) or (
        name not in _CLIP_MODELS and (os.path.exists(name) or os.sep in name or name.endswith(".safetensors"))
    ):
        if overrides or pretrained is not None:
            raise ConfigError("create_clip(path) rebuilds a saved model as it was; overrides need a registered name")
        return load_clip(name)
    entry = _CLIP_MODELS.get(name)
    model = build_two_tower(apply_overrides(clip_model_args(name), overrides))
    if entry is not None:
        model.card = replace(model.card, paper=entry.paper, notes=entry.notes or model.card.notes)
    if pretrained is not None:
        if pretrained is True:
            raise ConfigError(f"{name} has no published weights registered; pass pretrained=<weights file or run dir>")
        _load_into(model, load_clip(pretrained).state_dict(), str(pretrained))
    return model


# ---------------------------------------------------------------------- saved models
def _weights_file(path: Path) -> Path | None:
    """The vitkit weights file ``path`` stands for (itself, a run's weights, a folder's model.safetensors)."""
    if path.is_file():
        return path
    run = RunDir(path)
    if run.is_run():
        return run.weights()
    if (path / WEIGHTS).is_file():
        return path / WEIGHTS
    return None


def read_clip_args(path: str | os.PathLike) -> dict | None:
    """The two-tower ``model_args`` stored in a vitkit weights file (or a run directory's), else None."""
    weights = _weights_file(Path(path).expanduser())
    if weights is None or weights.suffix != ".safetensors":
        return None
    try:
        args = json.loads(read_metadata(weights).get("model_args") or "{}")
    except json.JSONDecodeError:
        return None
    return args if isinstance(args, dict) and {"image", "text", "embed_dim"} <= set(args) else None


def is_clip_weights(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a two-tower weights file (or run directory) that vitkit wrote."""
    return read_clip_args(path) is not None


def _load_into(model: TwoTower, state_dict: dict, where: str) -> None:
    sd = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(sd) & set(own))
              if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise WeightsError(
            f"{where} does not fit {model.model_name}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"other shapes {shapes[:3]}; build the model with the arguments the weights were saved with "
            "(load_clip(path) does)"
        )
    model.load_state_dict(sd)


def load_clip(path: str | os.PathLike) -> TwoTower:
    """A saved two-tower model, in eval mode: a vitkit weights file written by ``save_weights`` (or a
    run directory) is rebuilt from the config it carries; other files (open_clip, transformers
    folders) go through ``vitkit.clip.load.load_clip_weights``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PathNotFoundError(
            f"no such file or folder: {str(path)!r}; pass a two-tower weights file, a run directory, "
            "or an open_clip / transformers checkpoint"
        )
    args = read_clip_args(p)
    if args is not None:
        weights = _weights_file(p)
        model = build_two_tower(args)
        sd, where = read_state_dict(weights)
        _load_into(model, sd, where)
        saved_card = json.loads(read_metadata(weights).get("card") or "{}")
        return with_card(model, saved_card).eval()
    try:
        # Foreign layouts (open_clip files, transformers folders) are read by the optional module
        # vitkit.clip.load, which builds on model.py and the converters and never imports this one.
        loader = importlib.import_module(f"{__package__}.load")
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.load":
            raise
        raise ConfigError(
            f"{path} is not a two-tower weights file written by vitkit (no two-tower config in its metadata); "
            "pass a file saved with vitkit.save_weights(model, path) or a CLIP run directory"
        ) from None
    return loader.load_clip_weights(p).eval()


# ---------------------------------------------------------------------- variants
_CLIP_BPE_VOCAB = 49408


def _clip_bpe(context_length: int) -> dict:
    return {"kind": "clip_bpe", "context_length": context_length}


def _openai_clip(patch: int) -> dict:
    # OpenAI's ViT-B towers: pre-norm before the blocks (no patch bias), quick GELU, LayerNorm eps 1e-5.
    return dict(
        image=dict(model=f"vit_base_patch{patch}_224", pre_norm=True, act_layer="quick_gelu", norm_eps=1e-5),
        text=dict(vocab_size=_CLIP_BPE_VOCAB, context_length=77, width=512, depth=12, num_heads=8, output_dim=512,
                  act_layer="quick_gelu", norm_eps=1e-5, causal=True, pool="argmax"),
        embed_dim=512, image_proj="linear", init_logit_scale=math.log(1 / 0.07), init_logit_bias=None,
        max_logit_scale=math.log(100), tokenizer=_clip_bpe(77), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
    )


@register_clip("clip_vit_b32", paper=CLIP_PAPER, notes="OpenAI CLIP ViT-B/32 sizes")
def _clip_vit_b32() -> dict:
    return _openai_clip(32)


@register_clip("clip_vit_b16", paper=CLIP_PAPER, notes="OpenAI CLIP ViT-B/16 sizes")
def _clip_vit_b16() -> dict:
    return _openai_clip(16)


def _siglip_text(**kw) -> dict:
    # SigLIP's text tower: no causal mask, the last position pooled, a biased projection.
    return dict(dict(act_layer="gelu_tanh", norm_eps=1e-6, causal=False, pool="last", proj_bias=True), **kw)


_SIGLIP_LOGITS = dict(init_logit_scale=math.log(10), init_logit_bias=-10.0, max_logit_scale=math.log(100))


@register_clip("siglip_vit_b16", paper=SIGLIP_PAPER,
               notes="SigLIP B/16 (timm-trunk layout: no class token, MAP pool); its SentencePiece vocabulary "
                     "comes with a checkpoint")
def _siglip_vit_b16() -> dict:
    return dict(
        image=dict(model="vit_base_patch16_224", class_token=False, global_pool="map", act_layer="gelu_tanh"),
        text=_siglip_text(vocab_size=32000, context_length=64, width=768, depth=12, num_heads=12, output_dim=768),
        embed_dim=768, image_proj="none", tokenizer=None, mean=SIGLIP_MEAN, std=SIGLIP_STD, **_SIGLIP_LOGITS,
    )


# Tiny models for tests: 32 px, width 64, two blocks per tower, 16 text tokens.
_TEST_TEXT = dict(vocab_size=_CLIP_BPE_VOCAB, context_length=16, width=64, depth=2, num_heads=2)


@register_clip("clip_test", paper="tiny test variant", notes="for tests; not a real model")
def _clip_test() -> dict:
    return dict(
        image=dict(model="test_vit", pre_norm=True, act_layer="quick_gelu", norm_eps=1e-5),
        text=dict(_TEST_TEXT, output_dim=32, act_layer="quick_gelu", norm_eps=1e-5, causal=True, pool="argmax"),
        embed_dim=32, image_proj="linear", init_logit_scale=math.log(1 / 0.07), init_logit_bias=None,
        max_logit_scale=math.log(100), tokenizer=_clip_bpe(16), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
    )


@register_clip("siglip_test", paper="tiny test variant", notes="for tests; not a real model")
def _siglip_test() -> dict:
    return dict(
        image=dict(model="test_vit", class_token=False, global_pool="map", act_layer="gelu_tanh"),
        text=_siglip_text(**_TEST_TEXT, output_dim=64),
        embed_dim=64, image_proj="none", tokenizer=_clip_bpe(16), mean=SIGLIP_MEAN, std=SIGLIP_STD, **_SIGLIP_LOGITS,
    )


# Small models that train on a CPU in minutes (64 px images, 32 text tokens, CLIP's BPE).
_NANO_TEXT = dict(vocab_size=_CLIP_BPE_VOCAB, context_length=32, width=128, depth=3, num_heads=4)


@register_clip("clip_nano", paper=CLIP_PAPER, notes="small CLIP for 64 px images, trains on a CPU")
def _clip_nano() -> dict:
    return dict(
        image=dict(model="vit_nano_convstem_patch8_64"),
        text=dict(_NANO_TEXT, output_dim=128, act_layer="gelu", causal=True, pool="argmax"),
        embed_dim=128, image_proj="linear", init_logit_scale=math.log(1 / 0.07), init_logit_bias=None,
        max_logit_scale=math.log(100), tokenizer=_clip_bpe(32), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
    )


@register_clip("siglip_nano", paper=SIGLIP_PAPER, notes="small SigLIP for 64 px images, trains on a CPU")
def _siglip_nano() -> dict:
    return dict(
        image=dict(model="vit_nano_convstem_patch8_64", class_token=False, global_pool="map", act_layer="gelu_tanh"),
        text=_siglip_text(**_NANO_TEXT, output_dim=192),
        embed_dim=192, image_proj="none", tokenizer=_clip_bpe(32), mean=SIGLIP_MEAN, std=SIGLIP_STD,
        **_SIGLIP_LOGITS,
    )


__all__ = [
    "apply_overrides", "clip_model_args", "create_clip", "is_clip_weights", "list_clip_models", "load_clip",
    "read_clip_args", "register_clip",
]
