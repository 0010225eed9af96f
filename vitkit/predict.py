"""`predict(source, images)`: class probabilities for images, from a run dir or a weights file.

:func:`load_model` is the one place that turns what training left behind into a model with its
preprocessing; :func:`vitkit.evaluate.evaluate` uses it too. A source is

- a run directory (``run.json`` inside): its final ``model.safetensors``; for a run that did not
  finish, the ``checkpoints/best/`` weights, else the latest checkpoint's;
- a checkpoint directory of a run (``<run>/checkpoints/step_N/`` or ``best/``);
- a ``.safetensors`` file written by ``save_weights`` (it carries the model config and class
  names), or a folder holding one as ``model.safetensors``.

>>> from vitkit.predict import predict
>>> predict("runs/my-run", ["cat.jpg"], topk=3)
[{'path': 'cat.jpg', 'top': [{'label': 'cat', 'prob': 0.91}, ...]}]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .data import BadImageError, EvalTransform, Normalize, decode_image
from .engine.checkpoint import STATE_FILE, find_latest
from .engine.runtime import resolve_device
from .errors import ConfigError, DataError, PathNotFoundError, RunDirError, WeightsError

_WEIGHTS = "model.safetensors"


@dataclass
class LoadedModel:
    """A model ready for inference, with the preprocessing it was trained with.

    ``settings`` holds the run's data settings that decide which images form a split
    (``val_fraction``, ``seed``, ``max_bad_fraction``); empty for a bare weights file.
    """

    model: nn.Module
    transform: EvalTransform
    normalize: Normalize
    labels: tuple[str, ...]
    weights: Path
    run_dir: Path | None
    device: torch.device
    settings: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def in_chans(self) -> int:
        return self.transform.in_chans

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) from ``transform`` -> float32 logits (B, num_classes)."""
        return self.model(self.normalize(images.to(self.device))).float()


def _run_config(run_dir: Path | None) -> dict:
    """The run's resolved config.yaml as a plain dict (empty when there is none)."""
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))


def _saved_model_name(path: Path) -> str | None:
    """The ``model_name`` that ``save_weights`` stores in a safetensors file, or None."""
    if path.suffix != ".safetensors":
        return None
    from .convert.weights import read_metadata

    return read_metadata(path).get("model_name") or None


def _owning_run(path: Path) -> Path | None:
    """The run directory above a checkpoint directory or weights file (up to three levels)."""
    for cand in list(path.parents)[:3]:
        if (cand / "run.json").is_file():
            return cand
    return None


def _checkpoint_file(ckpt: Path, use_ema: bool) -> Path:
    name = "ema.safetensors" if use_ema else _WEIGHTS
    if not (ckpt / name).is_file():
        if use_ema:
            raise RunDirError(f"{ckpt} has no EMA weights: the run was trained without engine.ema_decay")
        raise PathNotFoundError(f"checkpoint {ckpt} has no {name}")
    return ckpt / name


def _resolve(source: str | os.PathLike, use_ema: bool) -> tuple[Path, Path | None]:
    """source -> (weights file, run directory or None)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise PathNotFoundError(f"no such file or folder: {source}: pass a vitkit run directory or a .safetensors weights file")
    if path.is_file():
        if use_ema:
            raise ConfigError(f"EMA weights live in a run's checkpoints; {path} is a single weights file")
        return path, _owning_run(path)
    if (path / "run.json").is_file():
        if (path / _WEIGHTS).is_file() and not use_ema:
            return path / _WEIGHTS, path
        # A finished run's final weights are its latest checkpoint's; an unfinished run's best are in best/.
        best = path / "checkpoints" / "best"
        ckpt = find_latest(path) if (path / _WEIGHTS).is_file() or not best.is_dir() else best
        if ckpt is None:
            raise RunDirError(
                f"run {path} has no {_WEIGHTS} and no checkpoint yet: train it (vitkit train --resume --out {path})"
            )
        return _checkpoint_file(ckpt, use_ema), path
    if (path / STATE_FILE).is_file():
        return _checkpoint_file(path, use_ema), _owning_run(path)
    if (path / _WEIGHTS).is_file() and not use_ema:
        return path / _WEIGHTS, None
    raise RunDirError(
        f"{path} is not a vitkit run directory (no run.json), a checkpoint directory (no {STATE_FILE}) "
        f"or a folder with {_WEIGHTS}"
    )


def load_model(
    source: str | os.PathLike, *, use_ema: bool = False, device: str | torch.device | None = None
) -> LoadedModel:
    """Rebuild the model of a run directory, checkpoint or weights file, in eval mode.

    Args:
        source: see the module notes.
        use_ema: the EMA weights of the run's checkpoint (needs a run trained with engine.ema_decay).
        device: defaults to CUDA when available, else the CPU.
    """
    from .convert import load_weights
    from .models import create_model

    weights, run_dir = _resolve(source, use_ema)
    cfg = _run_config(run_dir)
    if _saved_model_name(weights):
        model = create_model(str(weights))
    elif run_dir is not None:
        run = json.loads((run_dir / "run.json").read_text())
        model = create_model(
            run["model"], num_classes=run["num_classes"], img_size=run["img_size"], in_chans=run["in_chans"],
            **dict(cfg.get("model", {}).get("args") or {}),
        )
        load_weights(model, weights, verbose=False)
        model.card = replace(
            model.card, labels=tuple(run["classes"]), mean=tuple(run["mean"]), std=tuple(run["std"])
        )
    else:
        raise WeightsError(
            f"{weights} holds no model config (it was not written by save_weights) and no run.json sits above it: "
            "pass the run directory, or build the model with vitkit.create_model(name) and vitkit.load_weights"
        )
    card = model.card
    data_cfg = cfg.get("data", {})
    crop_pct = data_cfg.get("crop_pct") or card.crop_pct
    in_chans, height, width = card.input_size
    dev = resolve_device(device)
    labels = tuple(card.labels) if len(card.labels) == model.num_classes else ()
    settings = {k: data_cfg[k] for k in ("val_fraction", "max_bad_fraction") if k in data_cfg}
    if "seed" in cfg.get("engine", {}):
        settings["seed"] = cfg["engine"]["seed"]
    return LoadedModel(
        model=model.to(dev).eval(),
        transform=EvalTransform((height, width), in_chans, crop_pct=crop_pct, interpolation=card.interpolation),
        normalize=Normalize(card.mean, card.std),
        labels=labels,
        weights=weights,
        run_dir=run_dir,
        device=dev,
        settings=settings,
    )


def _read_image(image: str | os.PathLike | Image.Image, in_chans: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    try:
        return decode_image(str(image), in_chans, name=str(image))
    except BadImageError as e:
        raise DataError(f"cannot read image {e}") from None


def predict(
    source: str | os.PathLike | LoadedModel,
    images: list[str | os.PathLike | Image.Image],
    *,
    topk: int = 5,
    batch_size: int = 64,
) -> list[dict]:
    """Top-``topk`` class probabilities for each image.

    Args:
        source: a run directory, checkpoint or weights file (see the module notes), or a
            :class:`LoadedModel` to reuse across calls.
        images: file paths or PIL images.
        topk: how many classes to return per image (at most the model's class count).

    Returns:
        ``[{"path": str or None, "top": [{"label": str, "prob": float}, ...]}, ...]`` in input
        order, most probable first. Labels are the class names the model was trained with,
        or class indices as strings when it carries none.
    """
    if topk < 1:
        raise ConfigError(f"topk must be >= 1, got {topk}")
    lm = source if isinstance(source, LoadedModel) else load_model(source)
    for image in images:
        if not isinstance(image, Image.Image) and not Path(image).is_file():
            raise PathNotFoundError(f"no such file: image {image}")
    labels = lm.labels or tuple(str(i) for i in range(lm.num_classes))
    k = min(topk, lm.num_classes)
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = torch.stack([lm.transform(_read_image(im, lm.in_chans)) for im in chunk])  # (B, C, H, W) uint8
        probs = lm.logits(batch).softmax(-1).cpu()  # (B, num_classes)
        top = probs.topk(k, dim=-1)
        for im, p, idx in zip(chunk, top.values.tolist(), top.indices.tolist()):
            path = (getattr(im, "filename", "") or None) if isinstance(im, Image.Image) else str(im)
            results.append({"path": path, "top": [{"label": labels[i], "prob": v} for i, v in zip(idx, p)]})
    return results
