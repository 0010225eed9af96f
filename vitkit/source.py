"""`load_model(source)`: the one answer to "where does this model come from".

Every command that reads a model (eval, predict, explain, export, bench, probe, demo) and the
distillation teacher go through :func:`load_model`. A source is

- a run directory (``run.json`` inside): its final weights; for a run that did not finish, its
  ``checkpoints/best/`` weights, else its latest checkpoint's (see :meth:`RunDir.weights`);
- a checkpoint directory of a run (``<run>/checkpoints/step_N/`` or ``best/``);
- a ``.safetensors`` file written by ``save_weights`` (it carries the model config and class
  names), or a folder holding one as ``model.safetensors``;
- any other weights file or folder (timm, Hugging Face, official layouts), or a hub repo id,
  with ``model_name`` naming the architecture (a hub id that a registered model's card
  publishes needs no name);
- a registered model name: its published weights (``pretrained=False``: random weights).

A run fine-tuned with a parameter-efficient method (``peft.method``) gives its model with the
method applied (``model.peft_info``); a merged export of it (``vitkit export RUN --merge``) is a
plain weights file.

A segmentation or depth run (or its final weights file) gives a :class:`~vitkit.dense.DenseModel`:
``task`` says which, ``transform`` keeps the image at its own size (the model pads to its
stride and predicts every pixel), and :meth:`LoadedModel.dense` returns the per-pixel output.
A detection run (or its weights file) gives its :class:`~vitkit.detect.Detector` (``task`` is
``"detect"``): ``transform`` resizes the image keeping its aspect (long side as trained) and
:meth:`LoadedModel.detect` returns boxes, scores and labels.
An image-text run (CLIP, SigLIP; or its weights file, or open_clip / Hugging Face two-tower weights)
gives its :class:`~vitkit.clip.TwoTower` (``task`` is ``"caption"``, see :func:`load_clip_model`):
``transform`` resizes the shorter side and centre-crops as in training's evaluation, and
:meth:`LoadedModel.image_embeds` / :meth:`LoadedModel.text_embeds` return normalised embeddings.

>>> from vitkit import load_model
>>> lm = load_model("runs/my-run")
>>> lm.model, lm.labels, lm.transform
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .convert.weights import load_weights
from .data import EvalTransform, Normalize, pil_to_uint8, to_channels
from .engine.runtime import resolve_device
from .errors import ConfigError, PathNotFoundError, RunDirError, WeightsError
from .models import create_model, get_model_card, list_models
from .rundir import RunDir, resolve_weights
from .weights_io import is_hub_id, read_metadata, read_state_dict

DENSE_TASKS = ("segment", "depth")


class LongSide:
    """PIL image -> uint8 (C, h, w) resized keeping its aspect so that the long side is ``size``
    (what a detector was evaluated on during training)."""

    def __init__(self, size: int, in_chans: int = 3):
        self.size, self.in_chans = int(size), in_chans

    def __call__(self, img, rng=None) -> torch.Tensor:
        import random

        import numpy as np

        from .data.boxes_tf import BoxEvalTransform

        empty = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64), "image_id": 0}
        return BoxEvalTransform(self.size, in_chans=self.in_chans)(img, empty, rng or random.Random(0))["image"]

    def __repr__(self) -> str:
        return f"LongSide(size={self.size}, in_chans={self.in_chans})"


class FullImage:
    """PIL image -> uint8 (C, H, W) at its own size: a dense model predicts every pixel of its input."""

    def __init__(self, in_chans: int = 3):
        self.in_chans = in_chans

    def __call__(self, img, rng=None) -> torch.Tensor:
        return pil_to_uint8(to_channels(img, self.in_chans))

    def __repr__(self) -> str:
        return f"FullImage(in_chans={self.in_chans})"


class ArchitectureNeededError(WeightsError):
    """The weights do not carry their architecture and no ``model_name`` names it.

    ``what`` says what the source is ("a weights file without vitkit metadata", ...), so a
    caller with its own option for the architecture (``objective.teacher_model``) can say which.
    """

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what


@dataclass
class LoadedModel:
    """A model ready for inference, with the preprocessing it was trained with.

    ``config`` is the run's resolved config (empty without a run directory); ``settings`` holds
    its data settings that decide which images form a split (``val_fraction``, ``seed``,
    ``max_bad_fraction``).
    """

    model: nn.Module
    transform: EvalTransform
    normalize: Normalize
    labels: tuple[str, ...]
    weights: Path | None
    run_dir: Path | None
    device: torch.device
    settings: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    task: str = "classify"
    window: int | None = None  # dense: sliding-window side for images larger than it (None: whole image)
    checkpoint_dir: Path | None = None  # the run's checkpoint the source named (not the run itself)

    @property
    def num_classes(self) -> int:
        return getattr(self.model, "num_classes", len(self.labels))

    @property
    def is_caption(self) -> bool:
        return self.task == "caption"

    @property
    def is_dense(self) -> bool:
        return self.task in DENSE_TASKS

    @property
    def is_detect(self) -> bool:
        return self.task == "detect"

    @property
    def in_chans(self) -> int:
        return self.transform.in_chans

    @property
    def home(self) -> Path:
        """Where outputs about this model go by default: the checkpoint named (so scoring one never
        overwrites the run's own ``eval.json``...), else its run, else its weights' folder, else here."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        if self.run_dir is not None:
            return self.run_dir
        return self.weights.parent if self.weights is not None else Path.cwd()

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) from ``transform`` -> float32 logits (B, num_classes)."""
        return self.model(self.normalize(images.to(self.device))).float()

    @torch.no_grad()
    def dense(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) from ``transform`` -> float32 (B, num_classes or 1, H, W): logits or depth."""
        from .dense.infer import dense_predict

        return dense_predict(self.model, self.normalize(images.to(self.device)), window=self.window).float()

    @torch.no_grad()
    def detect(self, images: torch.Tensor, sizes: torch.Tensor | None = None, top_k: int = 100) -> list[dict]:
        """uint8 (B, C, H, W) from ``transform`` (padded bottom/right; ``sizes`` (B, 2) the true (h, w), None:
        all real) -> per image ``boxes`` (N, 4) xyxy pixels of the transformed image, ``scores``, ``labels``."""
        from .objectives.detect import detect

        sizes = sizes.to(self.device) if sizes is not None else None
        return detect(self.model, self.normalize(images.to(self.device)), sizes, top_k)

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Two-tower models: uint8 (B, C, H, W) from ``transform`` -> float32 (B, E), unit norm."""
        return self.model.encode_image(self.normalize(images.to(self.device)), normalize=True).float()

    @torch.no_grad()
    def text_embeds(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Two-tower models: captions -> float32 (N, E), unit norm (tokenized with the model's tokenizer)."""
        out = [self.model.encode_text(self.model.tokenize(texts[i:i + batch_size]).to(self.device),
                                      normalize=True).float() for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, int(self.model.embed_dim), device=self.device)


def check_task(lm: LoadedModel, task: str | None) -> None:
    """``--task`` must name the model's own task: the data is read as what the model predicts."""
    if lm.task == "caption":
        raise ConfigError(
            f"{lm.weights or 'the model'} is an image-text (CLIP/SigLIP) model: it has no classes of its own; use "
            "`vitkit zeroshot RUN --data CLASS_FOLDERS` (zero-shot classification) or `vitkit retrieve RUN --data "
            "captions.jsonl` (retrieval)"
        )
    if task is not None and task != lm.task:
        raise ConfigError(
            f"--task {task}, but the model is a {lm.task} model ({lm.weights or 'a registered model'}): drop "
            f"--task, or pass a {task} run"
        )


def _dense_args(weights: Path, run: RunDir | None) -> dict | None:
    """The ``create_dense_model`` arguments of dense weights: from the file's metadata, else the run's run.json."""
    if weights.is_file() and weights.suffix == ".safetensors":
        args = json.loads(read_metadata(weights).get("model_args") or "{}")
        if "head" in args and "backbone" in args:
            return args
    if run is not None and run.is_run():
        info = run.read_run_info()
        if info.get("task") in DENSE_TASKS:
            return dict(info["model_args"])
    return None


def _detect_args(weights: Path, run: RunDir | None) -> dict | None:
    """The ``create_detector`` arguments of detection weights: from the file's metadata, else the run's run.json."""
    if weights.is_file() and weights.suffix == ".safetensors":
        args = json.loads(read_metadata(weights).get("model_args") or "{}")
        if "name" in args and "num_classes" in args and "head" not in args:
            from .detect import list_detectors

            if args["name"] in list_detectors():
                return args
    if run is not None and run.is_run():
        info = run.read_run_info()
        if info.get("task") == "detect":
            return dict(info["model_args"])
    return None


def is_detect_weights(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a weights file that ``save_weights`` wrote for a detector."""
    p = Path(path).expanduser()
    return p.is_file() and p.suffix == ".safetensors" and _detect_args(p, None) is not None


def _detect_from(weights: Path, args: dict, run: RunDir | None) -> nn.Module:
    """The detector ``args`` describe, with ``weights`` loaded; its card carries the classes and eval size."""
    from .detect import create_detector

    model = create_detector(**args)
    load_dense_weights(model, weights)
    card = model.card
    if run is not None and run.is_run() and card is not None:
        info = run.read_run_info()
        size = int(info.get("img_size") or card.input_size[1])
        card = replace(card, labels=tuple(info.get("classes") or card.labels), mean=tuple(info["mean"]),
                       std=tuple(info["std"]), input_size=(3, size, size))
    elif weights.suffix == ".safetensors" and card is not None:
        saved = json.loads(read_metadata(weights).get("card") or "{}")
        size = saved.get("input_size") or card.input_size
        card = replace(card, labels=tuple(saved.get("labels") or ()), input_size=tuple(size),
                       mean=tuple(saved.get("mean") or card.mean), std=tuple(saved.get("std") or card.std))
    if card is not None:
        model.backbone.card = card
    return model


def is_dense_weights(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a weights file that ``save_weights`` wrote for a dense model."""
    p = Path(path).expanduser()
    return p.is_file() and p.suffix == ".safetensors" and _dense_args(p, None) is not None


def load_dense_weights(model: nn.Module, weights: str | os.PathLike) -> None:
    """Load a dense model's (or a detector's) own weights file strictly, keeping its ``backbone.``/``head.`` names.

    (``load_weights`` reads the weights of a backbone and strips a ``backbone.`` prefix.)
    """
    sd, where = read_state_dict(weights)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        args = getattr(model, "model_args", {}) or {}
        raise WeightsError(
            f"{where} does not fit {type(model).__name__} ({args.get('backbone')} + "
            f"{args.get('head') or args.get('name')}): missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "build the model with the arguments the file was saved with"
        )


def _dense_from(weights: Path, args: dict, run: RunDir | None) -> nn.Module:
    """The DenseModel ``args`` describe, with ``weights`` loaded (names as saved: ``backbone.*``, ``head.*``)."""
    from .dense import create_dense_model

    model = create_dense_model(**args)
    load_dense_weights(model, weights)
    labels = tuple(json.loads(read_metadata(weights).get("card") or "{}").get("labels") or ()) \
        if weights.suffix == ".safetensors" else ()
    if run is not None and run.is_run():
        info = run.read_run_info()
        labels = tuple(info.get("classes") or labels)
        model.card = replace(model.card, mean=tuple(info["mean"]), std=tuple(info["std"]))
    if labels and len(labels) == model.num_classes:
        model.card = replace(model.card, labels=labels)
    return model


def is_clip_source(source: str | os.PathLike) -> bool:
    """Whether ``source`` is two-tower weights: a caption run (or a checkpoint or weights file of one), a file
    ``save_weights`` wrote for a :class:`~vitkit.clip.TwoTower`, or an open_clip / Hugging Face two-tower folder."""
    path = Path(source).expanduser()
    if not path.exists():
        return False
    try:
        weights, run = resolve_weights(path)
    except (RunDirError, WeightsError):
        return _foreign_two_tower(path)
    if run is not None and run.is_run() and run.read_run_info().get("task") == "caption":
        return True
    if weights.is_file() and weights.suffix == ".safetensors":
        meta = read_metadata(weights)
        args = json.loads(meta.get("model_args") or "{}")
        return isinstance(args, dict) and {"image", "text", "embed_dim"} <= set(args)  # TwoTower.model_args
    return _foreign_two_tower(path)


def _foreign_two_tower(path: Path) -> bool:
    """open_clip's hub layout (``open_clip_config.json``) or a Hugging Face CLIP/SigLIP folder."""
    folder = path if path.is_dir() else path.parent
    if (folder / "open_clip_config.json").is_file():
        return True
    config = folder / "config.json"
    if config.is_file():
        try:
            kind = json.loads(config.read_text()).get("model_type", "")
        except (OSError, ValueError):
            return False
        return kind in ("clip", "siglip", "siglip2")
    return False


def load_clip_model(source: str | os.PathLike, *, use_ema: bool = False,
                    device: str | torch.device | None = None) -> LoadedModel:
    """A two-tower model (CLIP, SigLIP) ready for zero-shot classification and retrieval.

    ``source``: a caption run directory (its final weights; ``use_ema``: its EMA weights), a checkpoint
    of one, its ``model.safetensors`` (self-describing: the two-tower config and its tokenizer), or
    open_clip / Hugging Face two-tower weights (see :func:`vitkit.clip.load_clip`). The transform is
    training's evaluation transform: shorter side resized, centre crop, the tower's normalisation.

    Raises:
        PathNotFoundError: nothing at ``source``.
        ConfigError: ``source`` is a vitkit model of another task (a classifier, a detector...).
    """
    from .clip import is_clip_weights, load_clip

    path = Path(source).expanduser()
    if not path.exists():
        raise PathNotFoundError(f"no such file or folder: {source}: pass a CLIP/SigLIP run directory or its "
                                "model.safetensors")
    if not is_clip_source(path):
        try:
            what = load_model(path, use_ema=use_ema, device="cpu").task
        except WeightsError:
            what = None
        kind = f"a {what} model" if what else "not a two-tower model"
        raise ConfigError(
            f"{source} is {kind}, not an image-text (CLIP/SigLIP) model: zero-shot classification and retrieval "
            "need a run trained on captions (vitkit train --data captions.jsonl, or shapes-captions) or open_clip / "
            "Hugging Face CLIP weights"
        )
    try:
        weights, run = resolve_weights(path, use_ema)
    except (RunDirError, WeightsError):
        weights, run = path, None
    # vitkit's own file rebuilds from its metadata; open_clip / HF layouts are read from what was named
    if is_clip_weights(weights) or run is None or not _checkpoint_of(weights, run):
        model = load_clip(weights if is_clip_weights(weights) else path)
    else:
        # A checkpoint's weights carry no metadata: the run's final file (self-described) rebuilds the model.
        if not is_clip_weights(run.final_weights):
            raise WeightsError(f"{source} is a checkpoint of {run.path}, whose {run.final_weights.name} (the model's "
                               "description) is missing: finish the run (vitkit train --resume) to load its checkpoints")
        model = load_clip(run.final_weights)
        model.load_state_dict(read_state_dict(weights)[0], strict=True)
    info = run.read_run_info() if run is not None and run.is_run() else {}
    card = getattr(model, "card", None) or getattr(model.visual, "card", None)
    size = int(info.get("img_size") or (card.input_size[-1] if card is not None else 224))
    mean = tuple(info.get("mean") or (card.mean if card is not None else Normalize().mean))
    std = tuple(info.get("std") or (card.std if card is not None else Normalize().std))
    interpolation = info.get("interpolation") or (getattr(card, "interpolation", None) or "bicubic")
    cfg = run.read_config() if run is not None else {}
    data_cfg = cfg.get("data", {})
    settings = {k: data_cfg[k] for k in ("val_fraction", "max_bad_fraction") if k in data_cfg}
    if "seed" in cfg.get("engine", {}):
        settings["seed"] = cfg["engine"]["seed"]
    dev = resolve_device(device)
    return LoadedModel(
        model=model.to(dev).eval(), transform=EvalTransform(size, 3, crop_pct=1.0, interpolation=interpolation),
        normalize=Normalize(mean, std), labels=tuple(info.get("classes") or ()), weights=weights,
        run_dir=run.path if run is not None else None, device=dev, settings=settings, config=cfg, task="caption",
        checkpoint_dir=_named_checkpoint(path, run),
    )


def _named_checkpoint(source: str | os.PathLike, run: RunDir | None) -> Path | None:
    """The checkpoint folder ``source`` names (a checkpoint directory or a file in one), else None."""
    path = Path(source).expanduser()
    if run is None or not path.exists():
        return None
    path, root = path.resolve(), run.checkpoints.resolve()
    if root not in path.parents:
        return None
    folder = root / path.relative_to(root).parts[0]
    return folder if folder.is_dir() else None


def _checkpoint_of(weights: Path, run: RunDir) -> bool:
    """Whether ``weights`` is a file inside one of ``run``'s checkpoints."""
    return weights.is_file() and run.checkpoints.resolve() in weights.resolve().parents


def _self_described(weights: Path) -> bool:
    return weights.is_file() and weights.suffix == ".safetensors" and bool(read_metadata(weights).get("model_name"))


def _peft_section(run: RunDir | None) -> dict | None:
    """The ``peft:`` section of a run that fine-tuned with a parameter-efficient method, else None."""
    if run is None or not run.is_run():
        return None
    section = run.read_config().get("peft") or {}
    return section if section.get("method") not in (None, "none") else None


def _refuse_adapter(weights: Path) -> None:
    """An adapter file holds a PEFT run's trained tensors alone: the model needs its base too."""
    from .peft.io import adapter_metadata, is_adapter_file

    if is_adapter_file(weights):
        meta = adapter_metadata(weights)
        raise ConfigError(
            f"{weights} is a {meta['method']} adapter, not a whole model: pass its run directory, or build its base "
            f"({meta['base_source']}) and call vitkit.peft.io.load_adapter(base, {str(weights)!r})"
        )


def _refuse_generative(source: str, weights: Path, run: RunDir | None) -> None:
    """A generative run draws images: it has no classifier for eval, predict and the rest."""
    from .generate.load import architecture

    arch = architecture(weights, run)
    if arch is None:
        return
    if arch[2] == "tokenizer":
        raise ConfigError(f"{source} is a VQ image tokenizer ({arch[0]}): it has no classes to evaluate or predict; "
                          f"train a generator on it (vitkit train --data DIR objective.name=maskgit "
                          f"objective.tokenizer={source}), then `vitkit sample` that run")
    raise ConfigError(f"{source} is a generative model ({arch[2]}, {arch[0]}): it draws images rather than classifying "
                      f"them; use `vitkit sample {source} --class K --n 64`")


def _weight_keys(weights: Path) -> list[str] | None:
    if not (weights.is_file() and weights.suffix == ".safetensors"):
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return list(f.keys())


def _from_run(weights: Path, run: RunDir, cfg: dict) -> nn.Module:
    """The model of run.json with ``weights`` loaded and the run's classes and normalisation.

    A run with a ``peft`` method gets it applied before the weights load (they hold the base's
    tensors and the method's), and ``model.peft_info`` records the base the run started from.
    """
    info = run.read_run_info()
    model = create_model(
        info["model"], num_classes=info["num_classes"], img_size=info["img_size"], in_chans=info["in_chans"],
        **dict(cfg.get("model", {}).get("args") or {}),
    )
    section = _peft_section(run)
    if section is not None:
        from .peft.io import apply_saved_peft

        apply_saved_peft(model, section, _weight_keys(weights), info.get("peft"))
    load_weights(model, weights, verbose=False)
    model.card = replace(model.card, labels=tuple(info["classes"]), mean=tuple(info["mean"]), std=tuple(info["std"]))
    return model


def _named(model_name: str, weights, num_classes: int | None) -> nn.Module:
    model = create_model(model_name, num_classes=num_classes)
    load_weights(model, weights, verbose=False)
    return model


def _hub_card_name(repo_id: str) -> str | None:
    """The registered model whose card publishes ``repo_id``, if any."""
    repo_id = repo_id.removeprefix("hf-hub:")
    return next((n for n in list_models() if get_model_card(n).hub_id == repo_id), None)


def _build(source: str, use_ema: bool, model_name: str | None, num_classes: int | None, pretrained: bool,
           img_size: int | None) -> tuple[nn.Module, Path | None, RunDir | None]:
    if Path(source).expanduser().exists():
        weights, run = resolve_weights(source, use_ema)
        _refuse_adapter(weights)
        _refuse_generative(source, weights, run)
        detect = _detect_args(weights, run)
        if detect is not None:
            return _detect_from(weights, detect, run), weights, run
        dense = _dense_args(weights, run)
        if dense is not None:
            return _dense_from(weights, dense, run), weights, run
        if _peft_section(run) is not None:
            return _from_run(weights, run, run.read_config()), weights, run
        if _self_described(weights):
            return create_model(str(weights)), weights, run
        if run is not None:
            return _from_run(weights, run, run.read_config()), weights, run
        if model_name:
            return _named(model_name, weights, num_classes), weights, None
        raise ArchitectureNeededError(
            f"{weights} holds no model config (it was not written by save_weights) and no run.json sits above it: "
            "pass the run directory, or name the architecture (load_model(path, model_name=...), or "
            "vitkit.create_model(name) and vitkit.load_weights)",
            "is a weights file without vitkit metadata",
        )
    if is_hub_id(source):
        name = model_name or _hub_card_name(source)
        if name is None:
            raise ArchitectureNeededError(
                f"no such file or folder: {source!r}; read as a hub id, no registered model publishes it, so its "
                "architecture is unknown: check the path, or name the architecture (model_name=...)",
                "is a hub id that no registered model publishes",
            )
        return _named(name, source, num_classes), None, None
    # A registered name; anything else gets create_model's "no such file" or "unknown model (did you mean)".
    return create_model(source, pretrained=pretrained, img_size=img_size), None, None


def load_model(
    source: str | os.PathLike,
    *,
    use_ema: bool = False,
    device: str | torch.device | None = None,
    model_name: str | None = None,
    num_classes: int | None = None,
    pretrained: bool = True,
    img_size: int | None = None,
) -> LoadedModel:
    """Build the model a source names (see the module notes), in eval mode, with its preprocessing.

    Args:
        source: a run or checkpoint directory, a weights file or folder, a registered name or a hub id.
        use_ema: the EMA weights of the run's checkpoint (needs a run trained with engine.ema_decay).
        device: defaults to CUDA when available, else the CPU.
        model_name: the architecture of weights that do not carry it (ignored for those that do).
        num_classes: the head of an architecture built from ``model_name`` (default: its card's).
        pretrained / img_size: for a registered name: load its published weights (else random
            ones), and the input size to build it at.
    """
    source = str(source)
    if is_clip_source(source):
        return load_clip_model(source, use_ema=use_ema, device=device)
    model, weights, run = _build(source, use_ema, model_name, num_classes, pretrained, img_size)
    cfg = run.read_config() if run is not None else {}
    card = model.card
    data_cfg = cfg.get("data", {})
    crop_pct = data_cfg.get("crop_pct") or card.crop_pct
    in_chans, height, width = card.input_size
    dev = resolve_device(device)
    labels = tuple(card.labels) if len(card.labels) == model.num_classes else ()
    settings = {k: data_cfg[k] for k in ("val_fraction", "max_bad_fraction") if k in data_cfg}
    if "seed" in cfg.get("engine", {}):
        settings["seed"] = cfg["engine"]["seed"]
    task = getattr(model, "task", "classify") if hasattr(model, "head") and hasattr(model, "stride") else "classify"
    if getattr(model, "task", None) == "detect" and callable(getattr(model, "postprocess", None)):
        task = "detect"
    dense = task in DENSE_TASKS
    if dense:
        in_chans = model.model_args.get("in_chans", in_chans)
        settings["ignore_index"] = data_cfg.get("ignore_index")  # the raw void value the user named, if any
    return LoadedModel(
        model=model.to(dev).eval(),
        transform=FullImage(in_chans) if dense else LongSide(max(height, width), 3) if task == "detect" else
        EvalTransform((height, width), in_chans, crop_pct=crop_pct, interpolation=card.interpolation),
        normalize=Normalize(card.mean, card.std),
        labels=labels,
        weights=weights,
        run_dir=run.path if run is not None else None,
        device=dev,
        settings=settings,
        config=cfg,
        task=task,
        window=(cfg.get("objective") or {}).get("window") if dense else None,
        checkpoint_dir=_named_checkpoint(source, run),
    )
