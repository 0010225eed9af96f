"""Adapter files and merging: what a parameter-efficient fine-tuning run keeps apart from its base.

An adapter file is a small safetensors file with the method's own parameters, the classifier head
and, under ``norm_stats="save"``, the BatchNorm statistics. Its metadata holds the PEFT config and
the sha256 of the base model it was trained on (over the base's weights without the head, see
:func:`~vitkit.peft.apply.state_sha256`), so it loads onto that base and no other:

>>> from vitkit.peft.io import load_adapter, save_adapter
>>> save_adapter(model, "adapter.safetensors", base_source="runs/pretrain/model.safetensors")
>>> base = vitkit.create_model("runs/pretrain/model.safetensors")
>>> load_adapter(base, "adapter.safetensors")  # base is now the fine-tuned model

:func:`merge_peft` folds LoRA into the base weights, leaving a plain model whose state dict has
the base's keys (timm and vitkit load it without this package).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, PathNotFoundError, WeightsError
from ..weights_io import read_metadata
from .apply import PeftInfo, apply_peft, state_sha256
from .config import PeftConfig
from .lora import merge_lora

FORMAT = "vitkit-adapter"
# Methods that train tensors the base already has: the fine-tuned state dict has the base's keys.
IN_PLACE = ("linear", "bitfit", "partial")
# LoRA's update is a weight delta that folds into the weight it adapts; prompts and adapters add
# computation that no base weight expresses, so those models keep their own keys.
MERGEABLE = ("lora", *IN_PLACE)


def _peft_of(model: nn.Module) -> tuple[PeftInfo, PeftConfig]:
    info, cfg = getattr(model, "peft_info", None), getattr(model, "peft_config", None)
    if info is None or cfg is None:
        raise ConfigError(
            f"{_name(model)} has no parameter-efficient fine-tuning applied (no peft_info): apply it with "
            "vitkit.peft.apply_peft(model, PeftConfig(method=...)), or save the whole model with vitkit.save_weights"
        )
    return info, cfg


def _name(model: nn.Module) -> str:
    return getattr(model, "model_name", "") or type(model).__name__


def _norm_stat_names(model: nn.Module) -> list[str]:
    """The state-dict names of every BatchNorm buffer (running mean and variance, batch count)."""
    return [
        f"{prefix}.{b}" if prefix else b
        for prefix, mod in model.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
        for b, value in mod.named_buffers(recurse=False) if value is not None
    ]


def adapter_names(model: nn.Module) -> list[str]:
    """The state-dict names an adapter file of ``model`` holds: the method's, the head's, and the
    BatchNorm statistics when ``norm_stats`` is ``"save"``."""
    info, cfg = _peft_of(model)
    names = [*info.params, *info.head]
    if cfg.norm_stats == "save":
        names += _norm_stat_names(model)
    return list(dict.fromkeys(names))


def save_adapter(model: nn.Module, path: str | os.PathLike, base_source: str | None = None) -> Path:
    """Write the trained part of a PEFT model (see :func:`adapter_names`) to a safetensors file.

    base_source: where the base weights came from (the ``--init`` path, a hub id...), recorded for
    the message that refuses the adapter on another base; by default the model name, noted as
    unrecorded. The write is atomic (a temporary file renamed over ``path``).
    """
    from safetensors.torch import save_file

    info, cfg = _peft_of(model)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"an adapter is written as safetensors; name the file *.safetensors, got {path.name}")
    state = model.state_dict()
    tensors = {k: state[k].detach().cpu().contiguous() for k in adapter_names(model)}
    card = getattr(model, "card", None)
    metadata = {
        "format": FORMAT,
        "method": info.method,
        "config": json.dumps(asdict(cfg)),
        "base_sha256": info.base_sha256,
        "base_source": base_source or f"{_name(model)} (base source not recorded)",
        "model_name": getattr(model, "model_name", ""),
        "n_method": str(info.n_method),
        "n_head": str(info.n_head),
        "n_base": str(info.n_base),
        "card": json.dumps(card.to_dict() if card is not None else {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp_{path.name}.{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def adapter_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of an adapter file; a WeightsError for a file that is not one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PathNotFoundError(f"no such adapter file: {path}")
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        what = "a vitkit weights file (load it with vitkit.load_model)" if meta.get("model_name") else "not one"
        raise WeightsError(
            f"{path} is not a vitkit adapter file ({what}): adapters are the adapter.safetensors that a run "
            "with peft.method writes, or the file save_adapter writes"
        )
    return meta


def adapter_size(path: str | os.PathLike) -> dict:
    """What an adapter file holds: ``bytes`` on disk, ``method``, ``n_method`` (the method's own
    parameters), ``n_head``, ``n_base`` (the base's parameters without the head), ``pct``
    (``100 * n_method / n_base``) and ``n_stats`` (BatchNorm statistics saved with it)."""
    from safetensors import safe_open

    meta = adapter_metadata(path)
    n_method, n_head, n_base = (int(meta[k]) for k in ("n_method", "n_head", "n_base"))
    with safe_open(str(path), framework="pt") as f:
        total = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {
        "bytes": Path(path).stat().st_size, "method": meta["method"], "n_method": n_method, "n_head": n_head,
        "n_base": n_base, "pct": 100.0 * n_method / max(n_base, 1), "n_stats": total - n_method - n_head,
    }


def config_from_dict(section: dict) -> PeftConfig:
    """A ``PeftConfig`` from its saved form (a run's ``peft:`` section, an adapter's metadata), checked."""
    known = {f.name for f in fields(PeftConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(
            f"unknown peft keys {unknown} (saved by another vitkit version?); this version knows {sorted(known)}"
        )
    cfg = PeftConfig(**section)
    cfg.check()
    return cfg


def _fit_head(model: nn.Module, tensors: dict[str, torch.Tensor], card: dict) -> None:
    """Give the base the adapter's classifier: its class count (a fresh head of that size) and class names."""
    names = [n for n in model.classifier_names() if f"{n}.weight" in tensors]
    if not names:
        return
    num_classes = int(tensors[f"{names[0]}.weight"].shape[0])
    if num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    old = getattr(model, "card", None)
    if old is None:
        return
    labels = tuple(card.get("labels") or ())
    keep = {k: tuple(card[k]) for k in ("mean", "std") if len(card.get(k) or ()) == len(old.mean)}
    model.card = replace(old, num_classes=num_classes, **({"labels": labels} if len(labels) == num_classes else {}),
                         **keep)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> PeftInfo:
    """Turn ``model``, the BASE an adapter was trained on (no PEFT applied), into the fine-tuned model.

    Applies the method from the file's config, gives the model the file's head (a fresh classifier
    when the class count differs), and loads the file's tensors; every one must fit. Returns the
    :class:`PeftInfo` (also ``model.peft_info``).

    Raises:
        ConfigError: ``model`` is not the base the adapter was trained on (its sha256 differs), or it
            already has a method applied.
        WeightsError: ``path`` is not an adapter file, or its tensors do not fit the model.
    """
    from safetensors.torch import load_file

    meta = adapter_metadata(path)
    if getattr(model, "peft_info", None) is not None:
        raise ConfigError(
            f"{_name(model)} already has {model.peft_info.method} applied: load the adapter {path} onto the base "
            "model it was trained on (a fresh vitkit.create_model(...) with the base weights)"
        )
    cfg = config_from_dict(json.loads(meta["config"]))
    sha = state_sha256(model, exclude=model.classifier_names())
    if sha != meta["base_sha256"]:
        raise ConfigError(
            f"adapter {path} was trained on base {meta['base_sha256'][:12]} ({meta.get('base_source', 'unknown')}), "
            f"this model is {sha[:12]}: load it onto the base it was trained on"
        )
    tensors = load_file(str(path))
    _fit_head(model, tensors, json.loads(meta.get("card") or "{}"))
    info = apply_peft(model, cfg)
    expected = set(adapter_names(model))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    state = model.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs model {tuple(state[k].shape)}"
                  for k, v in tensors.items() if k in state and v.shape != state[k].shape]
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"adapter {path} ({cfg.method}) does not fit {_name(model)} with that method applied: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {mismatched[:5]}; it was saved from "
            f"{meta.get('model_name') or 'another model'}"
        )
    model.load_state_dict(tensors, strict=False)
    return info


def apply_saved_peft(model: nn.Module, section: dict, weight_keys=None, base_sha256: str | None = None) -> PeftInfo | None:
    """Prepare a freshly built base for the weights a PEFT run saved (its ``model.safetensors`` or checkpoints).

    Applies the run's method (``section``: its config's ``peft:`` part) unless ``weight_keys`` (the
    names in the weights file, when known) hold none of the method's own tensors while the method
    adds some: such a file is a merged export, which the plain model fits. ``base_sha256`` is the
    run's record of its base (the freshly built weights are not the base). Returns the PeftInfo, or
    None when the model is left plain.
    """
    cfg = config_from_dict(section)
    if weight_keys is not None and cfg.method not in IN_PLACE and set(weight_keys) <= set(model.state_dict()):
        return None
    info = apply_peft(model, cfg)
    if base_sha256:
        model.peft_info = info = replace(info, base_sha256=base_sha256)
    return info


def merge_peft(model: nn.Module) -> nn.Module:
    """A PEFT model as a plain model with the base's keys (in place): LoRA folded into its weights;
    linear, BitFit and partial already are plain. VPT and AdaptFormer cannot be merged (ConfigError)."""
    info, _ = _peft_of(model)
    if info.method not in MERGEABLE:
        raise ConfigError(
            f"{info.method} cannot be merged into the base weights: its prompts or adapters add computation that "
            f"no base weight expresses (only {', '.join(MERGEABLE)} merge). Export it without --merge (ONNX and "
            "torch.export run it as it is), or load the run's model.safetensors with vitkit.load_model"
        )
    if info.method == "lora":
        merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(True)
    del model.peft_info, model.peft_config
    return model
