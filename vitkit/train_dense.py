"""The dense branch of :func:`vitkit.train.build_run`: segmentation and depth runs.

The same engine trains them: a :class:`~vitkit.dense.DenseModel` (backbone + registered head)
under the ``segment`` or ``depth`` objective, fed by joint transforms that scale, crop and flip
the image and its mask (or depth map) together in the loader workers. On the device the images
are only normalised (and colour-jittered when asked): mixup, random erasing and RandAugment
would move pixels away from their labels. The final weights are self-describing, so
``vitkit eval``, ``predict``, ``demo`` and :func:`vitkit.load_model` rebuild the dense model
from the file alone.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import time
from dataclasses import asdict, replace
from pathlib import Path

from .config import DENSE_OBJECTIVES, to_dict, user_keys, uses_plan
from .convert import load_weights
from .data import BatchAugment, Normalize, build_loader
from .engine import Trainer
from .engine.budget import Budget, parse_duration
from .engine.distributed import all_gather_object
from .engine.runtime import resolve_device
from .errors import ConfigError, VitkitError
from .objectives import build_objective, objective_config
from .objectives.registry import objective_keys
from .plan_calibrate import apply_plan
from .plan_dense import DenseChoice, choose_dense, dense_info, plan_dense_run
from .source import is_dense_weights, load_dense_weights


def default_out_dir(cfg, model_name: str) -> str:
    """``runs/<time>-<model>-<data>``: where a run goes when no ``--out`` is given."""
    data = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.data.path.rstrip("/")).name.split(":")[0]) or "data"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{stamp}-{model_name}-{data}")


def run_budget(cfg, start: float | None, plan, n_val: int) -> Budget | None:
    """The run's wall-clock budget (``engine.time_budget``), counted from ``start``; None without one."""
    if cfg.engine.time_budget is None:
        return None
    budget = Budget(parse_duration(cfg.engine.time_budget))
    budget.elapsed_before = time.monotonic() - start if start is not None else 0.0
    if plan is not None and plan.eval_img_per_s:
        budget.set_eval_rate(plan.eval_img_per_s, n_val, plan.img_per_s)
    return budget


def check_classify_config(cfg, data) -> None:
    """Dense settings on classification data are a ConfigError saying what the data is."""
    where = f"{cfg.data.path} holds class folders ({data.info.format}), a classification dataset"
    name = cfg.objective.get("name")
    if name in DENSE_OBJECTIVES:
        raise ConfigError(f"objective.name={name} needs masks or depth maps, but {where}: drop objective.name, "
                          "or point --data at a dense dataset (e.g. train/ + trainannot/)")
    if cfg.model.head:
        raise ConfigError(f"model.head={cfg.model.head} is for segmentation and depth, but {where}: drop model.head")


def dense_objective(cfg, task: str, named: bool):
    """(name, config dataclass) of the objective for ``task``; ``named``: the user set objective.name."""
    section = dict(cfg.objective)
    name = section.get("name")
    if named and name != task:
        kind = "a dense" if name in DENSE_OBJECTIVES else "a classification"
        raise ConfigError(
            f"objective.name={name} is {kind} objective, but the data is a {task} dataset: use objective.name={task} "
            f"(or drop objective.name; --task {name if name in DENSE_OBJECTIVES else 'classify'} reads the data "
            "as that task)"
        )
    return objective_config({**section, "name": task})


def _plan(cfg, info, train_ds, dist, objective_name: str, verbose: bool):
    """The dense plan, applied to ``cfg``; under torchrun every process takes rank 0's."""
    device = resolve_device(cfg.engine.device, dist.local_rank)
    plan = plan_dense_run(cfg, info, train_ds, user_keys(cfg), device, objective_keys(objective_name), verbose)
    if dist.enabled:
        plan.values, plan.reasons = all_gather_object((plan.values, plan.reasons))[0]
        apply_plan(cfg, plan)
    return plan


def build_dense_model(choice: DenseChoice, cfg, task: str, verbose: bool = True):
    """The DenseModel of ``choice``; ``model.init`` loads a dense weights file whole, other weights into the backbone."""
    from .dense import create_dense_model

    backbone_args = {"drop_path_rate": cfg.model.drop_path_rate, **dict(cfg.model.args)}
    try:
        model = create_dense_model(
            choice.backbone, choice.head, num_classes=choice.num_classes or None, task=task, img_size=choice.crop,
            in_chans=choice.in_chans, backbone_args=backbone_args, head_args=dict(cfg.model.head_args),
        )
    except (TypeError, ValueError) as e:  # the arguments come from the config: a user error, not a bug
        if isinstance(e, VitkitError):
            raise
        raise ConfigError(
            f"cannot build {choice.backbone} with the {choice.head} head at {choice.crop} px (model.args="
            f"{dict(cfg.model.args)}, model.head_args={dict(cfg.model.head_args)}): {e}"
        ) from e
    if cfg.model.init and is_dense_weights(cfg.model.init):  # a dense run's weights: fine-tune all of it
        load_dense_weights(model, cfg.model.init)
        if verbose:
            print(f"initialised the dense model from {cfg.model.init}")
    elif cfg.model.init:  # backbone weights (a classifier, a vitkit pretrain run, a hub id): the head starts fresh
        report = load_weights(model.backbone, cfg.model.init, verbose=verbose)
        if verbose and report is not None:
            print(f"initialised the backbone from {cfg.model.init}")
    return model


def build_dense_run(cfg, data, dist, verbose: bool = True, start: float | None = None):
    """:func:`vitkit.train.build_run` for a segmentation or depth :class:`~vitkit.data.stage.DataStage`."""
    d, task = cfg.data, data.task
    show = verbose and dist.is_main
    objective_name, objective_cfg = dense_objective(cfg, task, "objective.name" in user_keys(cfg))
    cfg.objective = {"name": objective_name, **asdict(objective_cfg)}
    info = dense_info(data, task)
    plan = _plan(cfg, info, data.train, dist, objective_name, show) if uses_plan(cfg) else None
    if plan is not None:  # planned objective keys (class weights, window) rebuild its config
        objective_name, objective_cfg = objective_config(cfg.objective)
    device = resolve_device(cfg.engine.device, dist.local_rank).type
    choice = choose_dense(cfg, info, device)
    if show and plan is None:
        print(choice.reason)
    model = build_dense_model(choice, cfg, task, verbose=show)
    classes = list(info.classes) or [str(i) for i in range(choice.num_classes)]
    card = model.card
    # The saved weights carry what inference needs: the class names.
    model.card = card = replace(card, labels=tuple(classes))
    train_ds, val_ds = data.train, data.val
    ignore = info.ignore_index if info.ignore_index is not None else 255
    from .data.joint import JointEvalTransform, JointTrainTransform

    workers = d.num_workers if d.num_workers is not None else min(4, os.cpu_count() or 1)
    train_tf = JointTrainTransform(choice.crop, choice.in_chans, hflip=d.hflip, ignore_index=ignore)
    common = dict(num_workers=workers, seed=cfg.engine.seed, distributed=dist.enabled,
                  max_bad_fraction=d.max_bad_fraction)
    train_loader = build_loader(train_ds, d.batch_size, train=True, transform=train_tf, **common)
    val_loader = build_loader(val_ds, d.eval_batch_size or d.batch_size, train=False,
                              transform=JointEvalTransform(choice.in_chans), **common)
    if len(train_loader) < cfg.engine.accum_steps:
        raise ConfigError(
            f"{len(train_ds)} training images make {len(train_loader)} full batches of data.batch_size={d.batch_size}"
            f" per process, fewer than one optimizer step of engine.accum_steps={cfg.engine.accum_steps}: lower "
            "data.batch_size (or accum_steps), or train on more images"
        )
    counts = list(info.class_pixels) or None
    objective = build_objective(objective_name, model, objective_cfg, num_classes=choice.num_classes,
                                ignore_index=ignore, class_counts=counts)
    label = f"{choice.backbone}-{choice.head}"
    out_dir = cfg.engine.out_dir if cfg.engine.out_dir != "runs/default" else default_out_dir(cfg, label)
    cfg.engine.out_dir = out_dir
    cfg.model.name, cfg.model.head, cfg.data.img_size = choice.backbone, choice.head, choice.crop
    # data.ignore_index stays as the user set it: it names a raw mask value, the dataset reads void as ``ignore``.
    cfg.data.in_chans, cfg.data.task = choice.in_chans, task
    if task == "segment":
        cfg.data.num_classes = choice.num_classes
    scan = data.scan
    run_info = {
        "task": task, "model": choice.backbone, "backbone": choice.backbone, "head": choice.head,
        "head_args": dict(cfg.model.head_args), "img_size": choice.crop, "in_chans": choice.in_chans,
        "num_classes": choice.num_classes, "classes": classes,
        "ignore_index": ignore if task == "segment" else None, "stride": int(model.stride),
        "choice": choice.reason, "data_format": info.format, "n_train": info.n_train, "n_val": info.n_val,
        "typical_size": list(info.typical_size), "mean": list(card.mean), "std": list(card.std),
        "interpolation": card.interpolation, "val_fraction": d.val_fraction, "seed": cfg.engine.seed,
        "model_args": model.model_args,
        "objective": {"name": objective_name, **asdict(objective_cfg), "references": objective.references()},
        "bad_files": scan.lines() if scan is not None else [],
        "class_pixels": dict(zip(classes, info.class_pixels)),
        "plan": plan.to_json() if plan is not None else None,
    }
    trainer = Trainer(
        objective, train_loader, val_loader, cfg=cfg.engine, optim_cfg=cfg.optim, sched_cfg=cfg.schedule,
        out_dir=out_dir, train_transform=BatchAugment(card.mean, card.std, color_jitter=d.color_jitter, re_prob=0.0),
        eval_transform=Normalize(card.mean, card.std), config_to_save=to_dict(cfg),
        budget=run_budget(cfg, start, plan, info.n_val),
    )
    return trainer, run_info
