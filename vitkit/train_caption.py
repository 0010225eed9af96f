"""The image-text branch of :func:`vitkit.train.build_run`: CLIP and SigLIP training through the one Trainer.

``model.name`` names a registered two-tower model (:func:`vitkit.clip.list_clip_models`: ``clip_nano``,
``siglip_nano``, ``clip_vit_b16``, ...), or an image backbone with ``model.head=clip`` or ``siglip``
(a text tower and the projections are built around it; ``model.init`` then initialises the image
tower only, from a vitkit run or any weights file). ``objective.name`` is ``clip`` or ``siglip``
(default: the model's kind). The tokenizer is the model's own (CLIP's BPE), or, with
``model.head_args.tokenizer=trained``, a byte-level BPE trained on the training captions
(``model.head_args.vocab_size``, default 4096) and saved in the run directory as ``tokenizer/``.

Images get a mild random resized crop (no flips: captions say left and right; no colour changes:
they name colours); each step draws one caption per image. Evaluation is retrieval on the val
split (recall@1/5/10 both ways; ``best/`` follows their mean ``r_mean``), plus zero-shot top-1/top-5
when the data has classes (``zeroshot_acc1``), with prompt templates unlike the captions. The final
``model.safetensors`` is self-describing (the two-tower config and its tokenizer), so
``vitkit zeroshot RUN`` and ``vitkit retrieve RUN`` rebuild everything from it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path

from .config import to_dict, user_keys, uses_plan
from .convert import load_weights
from .data import BatchAugment, Normalize, build_loader
from .engine import Trainer
from .engine.distributed import all_gather_object
from .engine.runtime import resolve_device
from .errors import ConfigError, VitkitError
from .objectives import build_objective, objective_config
from .plan_calibrate import apply_plan
from .plan_caption import (
    HEADS,
    SCALE_MIN,
    CaptionChoice,
    caption_info,
    choose_caption,
    is_two_tower,
    plan_caption_run,
    planned_logit_bias,
)
from .train_dense import default_out_dir, run_budget

# Keys of model.head_args that choose the tokenizer; the others are two-tower overrides (embed_dim, text={...}).
TOKENIZER_KEYS = ("tokenizer", "vocab_size")
TOKENIZER_DIR = "tokenizer"
# A model built around an image backbone (model.head=clip|siglip): its text tower and embedding width, unless
# model.head_args say otherwise; sized like the registered nano models, which train on a CPU.
TEXT_DEFAULTS = {"vocab_size": 49408, "context_length": 32, "width": 128, "depth": 3, "num_heads": 4}
HEAD_TEXT = {"clip": {"act_layer": "gelu", "causal": True, "pool": "argmax"},
             # SigLIP's text tower: no causal mask, the last position pooled, a biased projection
             "siglip": {"act_layer": "gelu_tanh", "norm_eps": 1e-6, "causal": False, "pool": "last", "proj_bias": True}}
EMBED_DIM = 128


def check_caption_config(cfg, data) -> None:
    """Two-tower settings on data without captions are a ConfigError saying what the data is."""
    if data.task == "caption":
        return
    head, objective = cfg.model.head, cfg.objective.get("name")
    two_tower = bool(cfg.model.name) and head is None and _registered_two_tower(cfg.model.name)
    if head in HEADS or objective in HEADS or two_tower:
        setting = (f"model.head={head}" if head in HEADS else f"objective.name={objective}" if objective in HEADS
                   else f"model.name={cfg.model.name}")
        raise ConfigError(
            f"{setting} trains an image-text (CLIP/SigLIP) model, but {cfg.data.path} holds {data.task} data "
            f"({data.reason or data.task}): point --data at captions (a .jsonl/.csv with 'image' and 'caption' or "
            "'captions', WebDataset jpg+txt shards, or shapes-captions), or drop the setting"
        )


def _registered_two_tower(name: str) -> bool:
    try:
        return is_two_tower(name)
    except ImportError:  # the clip extra is missing: such a name cannot be a two-tower model here
        return False


def _tokenizer_args(cfg) -> tuple[str, int]:
    args = dict(cfg.model.head_args)
    kind = str(args.get("tokenizer") or "model")
    if kind not in ("model", "trained"):
        raise ConfigError(f"model.head_args.tokenizer must be 'model' (the model's own) or 'trained' (a BPE trained "
                          f"on the training captions), got {kind!r}")
    return kind, int(args.get("vocab_size") or 4096)


def train_tokenizer(data, context_length: int, vocab_size: int, out_dir: str | None = None):
    """A byte-level BPE trained on the training split's captions (never the validation captions); a run
    being resumed in ``out_dir`` (checkpoints there) keeps the one it saved, so its token ids stay the same."""
    from .rundir import RunDir
    from .text import load_tokenizer, train_caption_tokenizer

    saved = Path(out_dir or "") / TOKENIZER_DIR
    if out_dir and RunDir(out_dir).list_checkpoints() and (saved / "tokenizer_config.json").is_file():
        return load_tokenizer(saved, context_length=context_length)

    captions = data.train.all_captions()
    if not captions:
        raise ConfigError(f"{data.train} has no captions to train a tokenizer on")
    return train_caption_tokenizer(captions, vocab_size=vocab_size, context_length=context_length)


def _head_overrides(cfg) -> dict:
    return {k: v for k, v in dict(cfg.model.head_args).items() if k not in TOKENIZER_KEYS}


def _head_model_args(choice: CaptionChoice, cfg, overrides: dict) -> dict:
    """The two-tower ``model_args`` of ``model.head`` around the image backbone ``model.name``."""
    siglip = choice.head == "siglip"
    embed_dim = int(overrides.pop("embed_dim", EMBED_DIM))
    text = {**TEXT_DEFAULTS, **HEAD_TEXT[choice.head], **dict(overrides.pop("text", None) or {}),
            "output_dim": embed_dim}
    image = {"model": choice.model, "drop_path_rate": cfg.model.drop_path_rate, **dict(cfg.model.args)}
    if cfg.data.img_size:
        image["img_size"] = int(cfg.data.img_size)
    return {"name": f"{choice.model}-{choice.head}", "image": image, "text": text, "embed_dim": embed_dim,
            "image_proj": "linear", "init_logit_scale": math.log(10 if siglip else 1 / 0.07),
            "init_logit_bias": -10.0 if siglip else None, "max_logit_scale": math.log(100),
            "tokenizer": {"kind": "clip_bpe", "context_length": int(text["context_length"])}, **overrides}


def build_two_tower(choice: CaptionChoice, cfg, data, verbose: bool = True):
    """(TwoTower, trained tokenizer or None) of ``choice``: a registered two-tower model, or ``model.head``
    around an image backbone; ``model.init`` loads the image tower."""
    from .clip import build_two_tower as build_from_args
    from .clip import clip_model_args
    from .clip.registry import apply_overrides

    kind, vocab = _tokenizer_args(cfg)
    overrides = _head_overrides(cfg)
    tokenizer = None
    try:
        if choice.head is None:
            # A registered two-tower model: model.args and model.head_args both override its arguments.
            overrides = {**dict(cfg.model.args), **overrides}
            if cfg.data.img_size:
                overrides.setdefault("img_size", int(cfg.data.img_size))
            args = apply_overrides(clip_model_args(choice.model), overrides)
        else:
            args = _head_model_args(choice, cfg, overrides)
        if kind == "trained":
            tokenizer = train_tokenizer(data, int(args["text"]["context_length"]), vocab, cfg.engine.out_dir)
            args = apply_overrides(args, {"tokenizer": tokenizer})  # sizes the text tower's vocabulary and pooling
        model = build_from_args(args)
    except (TypeError, ValueError) as e:  # the arguments come from the config: a user error, not a bug
        if isinstance(e, VitkitError):
            raise
        raise ConfigError(
            f"cannot build {choice.model}{' + ' + choice.head if choice.head else ''} (model.args="
            f"{dict(cfg.model.args)}, model.head_args={dict(cfg.model.head_args)}): {e}"
        ) from e
    if cfg.model.init:  # a classifier, a vitkit pretraining run, a hub id: the image tower only
        report = load_weights(model.visual, cfg.model.init, verbose=verbose)
        if verbose and report is not None:
            print(f"initialised the image tower from {cfg.model.init}")
    return model, tokenizer


def _plan(cfg, info, data, choice, model, dist, verbose: bool):
    device = resolve_device(cfg.engine.device, dist.local_rank)
    plan = plan_caption_run(cfg, info, data.train, choice, model, user_keys(cfg), device, verbose,
                            world_size=dist.world_size if dist.enabled else 1)
    if dist.enabled:
        plan.values, plan.reasons = all_gather_object((plan.values, plan.reasons))[0]
        apply_plan(cfg, plan)
        planned_logit_bias(model, plan)
    return plan


def _card(model):
    """The card the image side follows (normalisation, input size): the two-tower's, else its image tower's."""
    card = getattr(model, "card", None)
    return card if card is not None else getattr(model.visual, "card", None)


def build_caption_run(cfg, data, dist, verbose: bool = True, start: float | None = None):
    """:func:`vitkit.train.build_run` for an image-text :class:`~vitkit.data.stage.DataStage`."""
    from .data.captions import CaptionTransform

    d = cfg.data
    show = verbose and dist.is_main
    info = caption_info(data)
    if info.n_train < 2:
        raise ConfigError(f"{d.path} has {info.n_train} training image(s): contrastive training needs at least 2")
    device = resolve_device(cfg.engine.device, dist.local_rank)
    choice = choose_caption(cfg, info, device.type)
    model, tokenizer = build_two_tower(choice, cfg, data, verbose=show)
    choice = choose_caption(cfg, info, device.type, model)
    plan = _plan(cfg, info, data, choice, model, dist, show) if uses_plan(cfg) else None
    if show and plan is None:
        print(choice.reason)
    named = "objective.name" in user_keys(cfg) or plan is not None
    section = dict(cfg.objective)
    section["name"] = section.get("name") if named and section.get("name") in HEADS else choice.objective
    if named and cfg.objective.get("name") not in HEADS:
        raise ConfigError(f"objective.name={cfg.objective.get('name')} is not an image-text objective: the data is "
                          "image-text pairs, use objective.name=clip or siglip (or drop it)")
    objective_name, objective_cfg = objective_config(section)
    cfg.objective = {"name": objective_name, **asdict(objective_cfg)}
    classes = list(info.classes)
    card = _card(model)
    mean, std = (tuple(card.mean), tuple(card.std)) if card is not None else (Normalize().mean, Normalize().std)
    train_ds, val_ds = data.train, data.val
    for ds in (train_ds, val_ds):
        ds.in_chans = 3
    scale_min = d.scale_min if "data.scale_min" in user_keys(cfg) or plan is not None else SCALE_MIN
    # No flips unless the user or the plan asks (captions may say left or right): data.hflip's 0.5 is the classifiers'.
    hflip = d.hflip if "data.hflip" in user_keys(cfg) or plan is not None else 0.0
    workers = d.num_workers if d.num_workers is not None else min(4, os.cpu_count() or 1)
    common = dict(num_workers=workers, seed=cfg.engine.seed, distributed=dist.enabled,
                  max_bad_fraction=d.max_bad_fraction)
    side = choice.img_size
    train_loader = build_loader(train_ds, d.batch_size, train=True,
                                transform=CaptionTransform(side, train=True, scale=(scale_min, 1.0), hflip=hflip),
                                **common)
    val_loader = build_loader(val_ds, d.eval_batch_size or d.batch_size * 2, train=False,
                              transform=CaptionTransform(side, train=False), **common)
    if len(train_loader) < cfg.engine.accum_steps:
        raise ConfigError(
            f"{len(train_ds)} training images make {len(train_loader)} full batches of data.batch_size={d.batch_size}"
            f" per process, fewer than one optimizer step of engine.accum_steps={cfg.engine.accum_steps}: lower "
            "data.batch_size (or accum_steps), or train on more images"
        )
    # With class names the evaluator adds zero-shot accuracy (prompt templates unlike the captions).
    objective = build_objective(objective_name, model, objective_cfg, classes=classes or None)
    label = choice.model + (f"-{choice.head}" if choice.head else "")
    out_dir = cfg.engine.out_dir if cfg.engine.out_dir != "runs/default" else default_out_dir(cfg, label)
    cfg.engine.out_dir = out_dir
    cfg.model.name, cfg.model.head, d.img_size = choice.model, choice.head, side
    d.in_chans, d.task, d.num_classes = 3, "caption", (len(classes) or None)
    if tokenizer is not None and dist.is_main:  # the run rebuilds its tokenizer from here too
        tokenizer.save(Path(out_dir) / TOKENIZER_DIR)
    scan = data.scan
    run_info = {
        "task": "caption", "model": label, "two_tower": choice.model if choice.head is None else None,
        "backbone": getattr(model.visual, "model_name", None) or choice.model, "head": choice.head,
        "img_size": side, "in_chans": 3, "num_classes": len(classes), "classes": classes, "choice": choice.reason,
        "data_format": info.format, "n_train": info.n_train, "n_val": info.n_val,
        "typical_size": list(info.typical_size), "captions_per_image": info.captions_per_image,
        "mean": list(mean), "std": list(std), "crop_pct": 1.0,
        "interpolation": getattr(card, "interpolation", "bicubic") if card is not None else "bicubic",
        "val_fraction": d.val_fraction, "seed": cfg.engine.seed, "model_args": model.model_args,
        # the tokenizer's kind and settings (a trained vocabulary is in the weights' metadata and tokenizer/)
        "tokenizer": {k: v for k, v in (model.tokenizer_config or {}).items() if k != "tokenizer_json"},
        "tokenizer_dir": TOKENIZER_DIR if tokenizer is not None else None,
        "objective": {"name": objective_name, **asdict(objective_cfg), "references": objective.references()},
        "bad_files": scan.lines() if scan is not None else [],
        "plan": plan.to_json() if plan is not None else None,
    }
    trainer = Trainer(
        objective, train_loader, val_loader, cfg=cfg.engine, optim_cfg=cfg.optim, sched_cfg=cfg.schedule,
        out_dir=out_dir, train_transform=BatchAugment(mean, std, color_jitter=0.0, re_prob=0.0),
        eval_transform=Normalize(mean, std), config_to_save=to_dict(cfg),
        budget=run_budget(cfg, start, plan, info.n_val),
    )
    return trainer, run_info
