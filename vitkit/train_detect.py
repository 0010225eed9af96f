"""The detection branch of :func:`vitkit.train.build_run`: a registered detector through the one Trainer.

``model.head`` names the detector (:func:`vitkit.detect.list_detectors`), ``model.name`` its
backbone and ``model.head_args`` its arguments; the ``detect`` objective feeds it padded batches
with a pixel mask and per-image targets, and evaluates COCO AP (``best/`` follows ``ap``). Images
are resized keeping their aspect (long side ``data.img_size``), randomly cropped and flipped with
their boxes in the loader workers; on the device they are only normalised (and colour-jittered).
The final weights are self-describing, so ``vitkit eval``, ``predict``, ``explain`` and
:func:`vitkit.load_model` rebuild the detector from the file alone.
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace

from .config import to_dict, user_keys, uses_plan
from .convert import load_weights
from .data import BatchAugment, Normalize, build_loader
from .engine import Trainer
from .engine.distributed import all_gather_object
from .engine.runtime import resolve_device
from .errors import ConfigError, VitkitError
from .objectives import build_objective, objective_config
from .plan_calibrate import apply_plan
from .plan_detect import (
    DET_SCALE_MIN,
    DetectChoice,
    choose_detect,
    detect_info,
    detector_kwargs,
    plan_detect_run,
)
from .source import is_detect_weights, load_dense_weights
from .train_dense import default_out_dir, dense_objective, run_budget


def check_detect_config(cfg, data) -> None:
    """A detector on data that is not detection data is a ConfigError saying what the data is."""
    if data.task == "detect":
        return
    head, named = cfg.model.head, cfg.objective.get("name") == "detect"
    from .detect import list_detectors

    if named or (head and head in list_detectors()):
        what = {"classify": "class folders, a classification dataset", "segment": "masks, a segmentation dataset",
                "depth": "depth maps, a depth dataset"}.get(data.task, f"a {data.task} dataset")
        setting = "objective.name=detect trains" if named else f"model.head={head} is"
        raise ConfigError(
            f"{setting} a detector, but {cfg.data.path} holds {what} ({data.reason or data.task}): point --data at "
            "boxes (a COCO JSON with 'bbox', Pascal VOC Annotations/*.xml, or scenes with --task detect), or drop "
            f"{'objective.name' if named else 'model.head'}"
        )


def _plan(cfg, info, train_ds, dist, verbose: bool):
    device = resolve_device(cfg.engine.device, dist.local_rank)
    plan = plan_detect_run(cfg, info, train_ds, user_keys(cfg), device, verbose)
    if dist.enabled:
        plan.values, plan.reasons = all_gather_object((plan.values, plan.reasons))[0]
        apply_plan(cfg, plan)
    return plan


def build_detector(choice: DetectChoice, cfg, verbose: bool = True):
    """The detector of ``choice``; ``model.init`` loads a detection weights file whole, other weights into
    the backbone (a classifier, a vitkit pretraining run, a hub id): the detection head starts fresh."""
    from .detect import create_detector

    try:
        model = create_detector(choice.detector, choice.backbone, num_classes=choice.num_classes,
                                **detector_kwargs(cfg))
    except (TypeError, ValueError) as e:  # the arguments come from the config: a user error, not a bug
        if isinstance(e, VitkitError):
            raise
        raise ConfigError(
            f"cannot build detector {choice.detector} on {choice.backbone or 'its default backbone'} (model.args="
            f"{dict(cfg.model.args)}, model.head_args={dict(cfg.model.head_args)}): {e}"
        ) from e
    if cfg.model.init and is_detect_weights(cfg.model.init):
        load_dense_weights(model, cfg.model.init)
        if verbose:
            print(f"initialised the detector from {cfg.model.init}")
    elif cfg.model.init:
        report = load_weights(model.backbone, cfg.model.init, verbose=verbose)
        if verbose and report is not None:
            print(f"initialised the backbone from {cfg.model.init}")
    return model


def build_detect_run(cfg, data, dist, verbose: bool = True, start: float | None = None):
    """:func:`vitkit.train.build_run` for a detection :class:`~vitkit.data.stage.DataStage`."""
    from .data.boxes_tf import BoxEvalTransform, BoxTrainTransform

    d = cfg.data
    show = verbose and dist.is_main
    objective_name, objective_cfg = dense_objective(cfg, "detect", "objective.name" in user_keys(cfg))
    cfg.objective = {"name": objective_name, **asdict(objective_cfg)}
    info = detect_info(data)
    if info.num_classes < 1:
        raise ConfigError(f"{d.path} has no object classes with boxes: a detector needs at least one")
    plan = _plan(cfg, info, data.train, dist, show) if uses_plan(cfg) else None
    if plan is not None:
        objective_name, objective_cfg = objective_config(cfg.objective)
    device = resolve_device(cfg.engine.device, dist.local_rank).type
    choice = choose_detect(cfg, info, device)
    model = build_detector(choice, cfg, verbose=show)
    if not cfg.data.img_size:  # the default size is a multiple of the detector's stride
        choice = choose_detect(cfg, info, device, stride=int(getattr(model, "stride", 16) or 16))
    if show and plan is None:
        print(choice.reason)
    classes = list(info.classes) or [str(i) for i in range(choice.num_classes)]
    backbone = model.backbone
    card = model.card
    if card is not None:  # the saved weights carry class names and the eval size
        backbone.card = card = replace(card, labels=tuple(classes), input_size=(3, choice.img_size, choice.img_size))
    train_ds, val_ds = data.train, data.val
    for ds in (train_ds, val_ds):
        ds.in_chans = 3
    scale_min = d.scale_min if "data.scale_min" in user_keys(cfg) or plan is not None else DET_SCALE_MIN
    workers = d.num_workers if d.num_workers is not None else min(4, os.cpu_count() or 1)
    common = dict(num_workers=workers, seed=cfg.engine.seed, distributed=dist.enabled,
                  max_bad_fraction=d.max_bad_fraction)
    train_tf = BoxTrainTransform(choice.img_size, scale=(scale_min, 1.0), hflip=d.hflip, in_chans=3)
    train_loader = build_loader(train_ds, d.batch_size, train=True, transform=train_tf, **common)
    val_loader = build_loader(val_ds, d.eval_batch_size or d.batch_size, train=False,
                              transform=BoxEvalTransform(choice.img_size, in_chans=3), **common)
    if len(train_loader) < cfg.engine.accum_steps:
        raise ConfigError(
            f"{len(train_ds)} training images make {len(train_loader)} full batches of data.batch_size={d.batch_size}"
            f" per process, fewer than one optimizer step of engine.accum_steps={cfg.engine.accum_steps}: lower "
            "data.batch_size (or accum_steps), or train on more images"
        )
    objective = build_objective(objective_name, model, objective_cfg, classes=classes)
    optim_cfg = objective.optim_config(cfg.optim)  # the backbone's lr multiplier, as lr groups
    detector_label = f"{choice.backbone or getattr(backbone, 'model_name', '')}-{choice.detector}".lstrip("-")
    out_dir = cfg.engine.out_dir if cfg.engine.out_dir != "runs/default" else default_out_dir(cfg, detector_label)
    cfg.engine.out_dir = out_dir
    cfg.model.name = choice.backbone or getattr(backbone, "model_name", None)
    cfg.model.head, cfg.data.img_size = choice.detector, choice.img_size
    cfg.data.in_chans, cfg.data.task, cfg.data.num_classes = 3, "detect", choice.num_classes
    mean, std = (card.mean, card.std) if card is not None else (Normalize().mean, Normalize().std)
    scan = data.scan
    run_info = {
        "task": "detect", "model": cfg.model.name, "backbone": cfg.model.name, "head": choice.detector,
        "head_args": dict(cfg.model.head_args), "img_size": choice.img_size, "in_chans": 3,
        "num_classes": choice.num_classes, "classes": classes, "stride": int(getattr(model, "stride", 1) or 1),
        "choice": choice.reason, "data_format": info.format, "n_train": info.n_train, "n_val": info.n_val,
        "typical_size": list(info.typical_size), "boxes_per_image": info.boxes_per_image,
        "box_area_frac": info.box_area_frac, "mean": list(mean), "std": list(std),
        "category_ids": list(getattr(train_ds, "category_ids", []) or range(1, choice.num_classes + 1)),
        "val_fraction": d.val_fraction, "seed": cfg.engine.seed, "model_args": model.model_args,
        "backbone_lr": objective.backbone_lr,
        "objective": {"name": objective_name, **asdict(objective_cfg), "references": objective.references()},
        "bad_files": scan.lines() if scan is not None else [],
        "plan": plan.to_json() if plan is not None else None,
    }
    trainer = Trainer(
        objective, train_loader, val_loader, cfg=cfg.engine, optim_cfg=optim_cfg, sched_cfg=cfg.schedule,
        out_dir=out_dir, train_transform=BatchAugment(mean, std, color_jitter=d.color_jitter, re_prob=0.0),
        eval_transform=Normalize(mean, std), config_to_save=to_dict(cfg),
        budget=run_budget(cfg, start, plan, info.n_val),
    )
    return trainer, run_info
