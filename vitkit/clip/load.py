"""CLIP-style weights published by others -> a :class:`~vitkit.clip.TwoTower`.

``load_clip_weights(path)`` reads

- an open_clip checkpoint (``.safetensors``, or ``.bin``/``.pth``/``.pt`` read with
  ``weights_only``) with open_clip's ``open_clip_config.json`` beside it, or such a folder (open_clip's
  hub layout: ``open_clip_config.json`` + ``open_clip_model.safetensors`` or
  ``open_clip_pytorch_model.bin``); an OpenAI-style checkpoint also reads without the config;
- a Hugging Face transformers folder (``config.json`` with ``model_type`` ``clip`` or ``siglip``, and
  ``model.safetensors`` or ``pytorch_model.bin``).

The tokenizer travels as the model's ``tokenizer_config``: CLIP's BPE for CLIP checkpoints, the
SentencePiece model beside the weights (``spiece.model``) for SigLIP ones.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import torch

from ..errors import ConfigError, PathNotFoundError, WeightsError
from ..weights_io import first_keys, read_state_dict, unwrap
from .convert_open_clip import convert_open_clip, open_clip_layout

OPEN_CLIP_CONFIG = "open_clip_config.json"
# open_clip's own preference when a folder holds several weight files.
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                   "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                   "model.pth")
HF_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_SPIECE_FILES = ("spiece.model", "tokenizer.model")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}; it must be the JSON config published with the weights") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object; it must be the config published with the weights")
    return data


def _open_clip_weights(folder: Path) -> Path:
    for name in OPEN_CLIP_FILES:
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    if len(files) == 1:
        return files[0]
    raise PathNotFoundError(
        f"{folder} has {OPEN_CLIP_CONFIG} but no weights file to go with it "
        f"({', '.join(p.name for p in files) or 'none found'}); expected {OPEN_CLIP_FILES[0]} or {OPEN_CLIP_FILES[2]}"
    )


def _hf_weights(folder: Path) -> Path:
    for name in HF_FILES:
        if (folder / name).is_file():
            return folder / name
    raise PathNotFoundError(f"{folder} has config.json but no {' or '.join(HF_FILES)}")


def _find(path: Path) -> tuple[str, Path, dict | None]:
    """(kind, weights file, config) for a path: kind is ``"open_clip"`` or ``"hf"``."""
    if path.is_dir():
        if (path / OPEN_CLIP_CONFIG).is_file():
            return "open_clip", _open_clip_weights(path), _read_json(path / OPEN_CLIP_CONFIG)
        if (path / "config.json").is_file():
            return "hf", _hf_weights(path), _read_json(path / "config.json")
        raise PathNotFoundError(
            f"{path} is neither an open_clip folder ({OPEN_CLIP_CONFIG} + weights) nor a Hugging Face folder "
            "(config.json + model.safetensors)"
        )
    if (path.parent / OPEN_CLIP_CONFIG).is_file():
        return "open_clip", path, _read_json(path.parent / OPEN_CLIP_CONFIG)
    if (path.parent / "config.json").is_file():
        config = _read_json(path.parent / "config.json")
        if config.get("model_type") in ("clip", "siglip"):
            return "hf", path, config
    return "open_clip", path, None


def _spiece(folder: Path) -> str | None:
    return next((str(folder / n) for n in _SPIECE_FILES if (folder / n).is_file()), None)


def _refuse_torchscript(path: Path) -> None:
    """OpenAI's original ``.pt`` files are TorchScript archives, which only ``torch.jit.load`` (running their code) reads."""
    if path.suffix not in (".pt", ".pth", ".bin") or not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as z:
        scripted = any(n.split("/", 2)[1:2] == ["code"] for n in z.namelist())
    if scripted:
        raise WeightsError(
            f"{path} is a TorchScript archive (OpenAI's original CLIP release), which vitkit does not execute; use "
            "open_clip's copy of the weights (e.g. the hub repo timm/vit_base_patch32_clip_224.openai, file "
            "open_clip_pytorch_model.bin) or re-save its state_dict() with torch.save"
        )


def _hf_convert(sd: dict, config: dict) -> tuple[dict, dict]:
    from .convert_hf import convert_hf_clip, convert_hf_siglip

    kind = config.get("model_type")
    if kind == "clip":
        return convert_hf_clip(sd, config)
    if kind == "siglip":
        return convert_hf_siglip(sd, config)
    raise ConfigError(
        f"config.json has model_type {kind!r}; vitkit reads transformers CLIPModel ('clip') and SiglipModel ('siglip')"
    )


def load_clip_weights(path: str | os.PathLike) -> torch.nn.Module:
    """An open_clip or Hugging Face CLIP/SigLIP checkpoint on disk -> an eval-mode ``TwoTower``.

    Args:
        path: an open_clip weights file (its ``open_clip_config.json`` beside it; optional for
            OpenAI-style checkpoints), an open_clip hub folder, or a transformers folder.
    Raises:
        PathNotFoundError: nothing at ``path``, or a folder without the files it needs.
        ConfigError / WeightsError: a layout or an option vitkit cannot convert (the message says which).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise PathNotFoundError(f"no such file or folder: {str(path)!r}")
    kind, weights, config = _find(path)
    _refuse_torchscript(weights)
    sd = unwrap(read_state_dict(weights)[0])
    if kind == "hf":
        model_args, sd = _hf_convert(sd, config)
    else:
        if open_clip_layout(sd) is None:
            raise WeightsError(
                f"{weights} is not an open_clip checkpoint (first keys: {first_keys(sorted(sd), 6)}); "
                f"an open_clip file needs {OPEN_CLIP_CONFIG} beside it, a transformers folder config.json, and a "
                "file saved by vitkit loads with vitkit.clip.load_clip"
            )
        model_args, sd = convert_open_clip(sd, config)
    tok = model_args.get("tokenizer")
    spiece = _spiece(weights.parent)
    if tok and tok.get("kind") == "sentencepiece" and not tok.get("model_path"):
        tok["model_path"] = spiece
    elif tok is None and kind == "hf" and config.get("model_type") == "siglip" and spiece:
        # transformers' SigLIP folders carry the SentencePiece model beside the weights.
        model_args["tokenizer"] = {"kind": "sentencepiece", "model_path": spiece, "source": str(weights.parent),
                                   "context_length": model_args["text"]["context_length"]}
    return _build_and_load(model_args, sd, str(weights))


def _build_and_load(model_args: dict, sd: dict, where: str) -> torch.nn.Module:
    from .model import build_two_tower

    model = build_two_tower(model_args)
    target = model.state_dict()
    for key in ("logit_scale", "logit_bias"):
        if key in sd and key in target:
            sd[key] = sd[key].reshape(target[key].shape)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        # The converters map every key they know; what is left is a part vitkit's towers do not have.
        raise WeightsError(
            f"the checkpoint {where} has parts vitkit's towers do not ({str(e).strip()}); it cannot be converted"
        ) from None
    return model.eval()


__all__ = ["load_clip_weights"]
