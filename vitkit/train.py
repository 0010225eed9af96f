"""`vitkit.train(cfg)`: data + model + objective + the engine, from one config.

The CLI's ``vitkit train`` is a thin wrapper over :func:`train`; a notebook calls the same:

>>> from vitkit.config import load_config
>>> summary = vitkit.train(load_config("deit_tiny_cifar10", ["data.path=/data/cifar10"]))
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace

import torch
import yaml
from torch import nn

from .config import TrainConfig, save_config, to_dict, user_keys, uses_plan
from .convert import load_weights
from .data import (
    BatchAugment,
    EvalTransform,
    ImageDataset,
    Mixup,
    Normalize,
    RepeatAugSampler,
    TrainTransform,
    build_loader,
    prepare_data,
)
from .data.augment import TrainAugment
from .data.balance import build_balance, check_weighted
from .engine import Trainer
from .engine.budget import PlateauStop, plateau_record
from .engine.distributed import all_gather_object, init_distributed
from .engine.runtime import resolve_device
from .errors import ConfigError, VitkitError
from .models import create_model, get_model_card
from .objectives import build_objective, objective_config
from .objectives.registry import objective_entry
from .plan import apply_plan, default_model, plan_run
from .plan_data import PIPELINE, STREAMING, batched_feed, resolve_data_path
from .rundir import RunDir, check_resume_config, prepare_out_dir, saved_config
from .train_caption import build_caption_run, check_caption_config
from .train_dense import build_dense_run, check_classify_config, default_out_dir, run_budget
from .train_detect import build_detect_run, check_detect_config
from .train_generate import build_generate_run, wants_generate
from .train_peft import apply_run_peft, check_peft_task, peft_run_info, save_run_adapter
from .train_promptable import build_promptable_run, wants_promptable
from .weights_io import save_weights


@dataclass
class ModelChoice:
    name: str
    img_size: int
    in_chans: int
    num_classes: int
    reason: str


def choose_model(cfg: TrainConfig, info) -> ModelChoice:
    """Pick the model and resolution from the data unless the config names them.

    The plan's size rule (:func:`vitkit.plan.default_model`): up to 48 px
    ``vit_nano_convstem_patch4_32`` at 32 px, up to 128 px ``vit_nano_convstem_patch16_64`` at
    64 px, larger photos ``deit_tiny_patch16_224`` at 224 px.
    """
    in_chans = cfg.data.in_chans or info.in_chans
    num_classes = cfg.data.num_classes or info.num_classes
    h, w = info.typical_size
    side = max(h, w)
    if cfg.model.name:
        card = get_model_card(cfg.model.name)
        img = cfg.data.img_size or card.input_size[1]
        why = f"model {cfg.model.name} as configured, at {img} px"
        return ModelChoice(cfg.model.name, img, in_chans, num_classes, why)
    name, img = default_model(side)
    img = cfg.data.img_size or img
    why = (
        f"images are typically {h}x{w} with {info.in_chans} channel(s) and {info.num_classes} classes, "
        f"so vitkit chose {name} at {img} px (set model.name / data.img_size to override)"
    )
    return ModelChoice(name, img, in_chans, num_classes, why)


def build_model(choice: ModelChoice, cfg: TrainConfig, verbose: bool = True) -> nn.Module:
    try:
        model = create_model(
            choice.name, num_classes=choice.num_classes, img_size=choice.img_size, in_chans=choice.in_chans,
            drop_path_rate=cfg.model.drop_path_rate, **dict(cfg.model.args),
        )
    except (TypeError, ValueError) as e:  # the arguments come from the config: a user error, not a bug
        if isinstance(e, VitkitError):
            raise
        raise ConfigError(
            f"cannot build {choice.name} at {choice.img_size} px with model.args={dict(cfg.model.args)}: {e}"
        ) from e
    if cfg.model.init:
        report = load_weights(model, cfg.model.init, verbose=verbose)
        if verbose and report is not None:
            print(f"initialised from {cfg.model.init}")
    apply_run_peft(model, cfg, verbose=verbose)  # freezes the base: after init, with the head sized
    return model


def _make_plan(cfg: TrainConfig, info, train_ds, dist, verbose: bool):
    """The data-aware plan, applied to ``cfg``; under torchrun every process takes rank 0's."""
    device = resolve_device(cfg.engine.device, dist.local_rank)
    plan = plan_run(cfg, info, train_ds, user_keys(cfg), device, verbose=verbose)
    if dist.enabled:
        plan.values, plan.reasons = all_gather_object((plan.values, plan.reasons))[0]
        apply_plan(cfg, plan)
    return plan


def build_run(cfg: TrainConfig, verbose: bool = True, start: float | None = None) -> tuple[Trainer, dict]:
    """Everything :func:`train` needs, without training: returns (trainer, run info).

    ``start`` (``time.monotonic()``) is when the run began: an ``engine.time_budget`` counts from it.
    """
    dist = init_distributed()
    d = cfg.data
    if wants_generate(cfg):  # a VQ tokenizer, MaskGIT, VAR or DiT on class folders
        check_peft_task(cfg, "generate")
        return build_generate_run(cfg, dist, verbose=verbose, start=start)
    if wants_promptable(cfg):  # SAM on instance masks: points, boxes and correction clicks
        check_peft_task(cfg, "promptable")
        data = prepare_data(d.path, val_fraction=d.val_fraction, seed=cfg.engine.seed, in_chans=d.in_chans,
                            task="promptable")
        return build_promptable_run(cfg, data, dist, verbose=verbose, start=start)
    # Broken files are found and judged before training, then left out.
    data = prepare_data(d.path, val_fraction=d.val_fraction, seed=cfg.engine.seed, in_chans=d.in_chans,
                        max_bad_fraction=d.max_bad_fraction, task=d.task, ignore_index=d.ignore_index)
    if verbose and dist.is_main and data.scan is not None:
        print(data.scan_line())
    check_detect_config(cfg, data)
    check_caption_config(cfg, data)
    check_peft_task(cfg, data.task)
    if data.task == "detect":  # a registered detector on the backbone
        return build_detect_run(cfg, data, dist, verbose=verbose, start=start)
    if data.task == "caption":  # an image tower and a text tower, trained contrastively
        return build_caption_run(cfg, data, dist, verbose=verbose, start=start)
    if data.task != "classify":  # segmentation, depth: a dense head on the backbone
        return build_dense_run(cfg, data, dist, verbose=verbose, start=start)
    check_classify_config(cfg, data)
    info, scan, train_ds, val_ds = data.info, data.scan, data.train, data.val
    plan = _make_plan(cfg, info, train_ds, dist, verbose and dist.is_main) if uses_plan(cfg) else None
    choice = choose_model(cfg, info)
    if verbose and dist.is_main and plan is None:
        print(choice.reason)
    model = build_model(choice, cfg, verbose=verbose and dist.is_main)
    card = model.card
    classes = list(getattr(train_ds, "classes", []) or [str(i) for i in range(choice.num_classes)])
    crop_pct = d.crop_pct or card.crop_pct
    # The saved weights carry what inference needs: class names and the eval preprocessing.
    model.card = card = replace(card, labels=tuple(classes), crop_pct=crop_pct)
    workers = d.num_workers if d.num_workers is not None else min(4, os.cpu_count() or 1)
    train_tf = TrainTransform(choice.img_size, choice.in_chans, scale=(d.scale_min, 1.0), hflip=d.hflip,
                              auto_augment=d.auto_augment, mean=card.mean)
    # Objectives that need their own data (multi-crop views) bring their pipeline.
    objective_name, objective_cfg = objective_config(cfg.objective)
    pipeline_fn = getattr(objective_entry(objective_name).cls, "train_pipeline", None)
    pipeline = pipeline_fn(objective_cfg, model, choice.img_size, choice.in_chans, card.mean, card.std) \
        if pipeline_fn is not None else None
    if pipeline is not None:
        train_tf = pipeline[0]
    eval_tf = EvalTransform(choice.img_size, choice.in_chans, crop_pct=crop_pct)
    sampler = None
    if d.repeated_aug > 1 and hasattr(train_ds, "__len__"):
        sampler = RepeatAugSampler(len(train_ds), num_repeats=d.repeated_aug, seed=cfg.engine.seed)
    balanced, class_weights = build_balance(d.balance, train_ds, info.class_counts, seed=cfg.engine.seed,
                                            distributed=dist.enabled, repeated_aug=d.repeated_aug)
    if balanced is not None:
        sampler = balanced
    # Where crops, flips and RandAugment run, and whether the images are decoded once (vitkit.plan_data).
    out_dir = cfg.engine.out_dir if cfg.engine.out_dir != "runs/default" else default_out_dir(cfg, choice.name)
    why_not = PIPELINE if pipeline is not None else None if isinstance(train_ds, ImageDataset) else STREAMING
    path = resolve_data_path(d, info, resolve_device(cfg.engine.device, dist.local_rank).type, choice.img_size,
                             choice.in_chans, why_not=why_not, user_keys=user_keys(cfg))
    store = geometry = None
    if path.augment_on == "device":
        train_tf, store, geometry = batched_feed(
            train_ds, d, path, info.typical_size, choice.img_size, card.mean, cache_dir=RunDir(out_dir).cache,
            num_workers=workers, log=print if verbose and dist.is_main else None)
    train_loader = build_loader(
        train_ds, d.batch_size, train=True, transform=train_tf, num_workers=workers, sampler=sampler,
        seed=cfg.engine.seed, distributed=dist.enabled, max_bad_fraction=d.max_bad_fraction, store=store,
    )
    val_loader = build_loader(
        val_ds, d.eval_batch_size or d.batch_size * 2, train=False, transform=eval_tf, num_workers=workers,
        seed=cfg.engine.seed, distributed=dist.enabled, max_bad_fraction=d.max_bad_fraction,
    )
    if len(train_loader) < cfg.engine.accum_steps:  # a user error; found here, it is a ConfigError
        raise ConfigError(
            f"{len(train_ds)} training images make {len(train_loader)} full batches of data.batch_size={d.batch_size}"
            f" per process, fewer than one optimizer step of engine.accum_steps={cfg.engine.accum_steps}: lower "
            "data.batch_size (or accum_steps), or train on more images"
        )
    mixup = None
    if d.mixup > 0 or d.cutmix > 0:
        mixup = Mixup(d.mixup, d.cutmix, prob=d.mix_prob, label_smoothing=d.label_smoothing,
                      num_classes=choice.num_classes)
    # The labelled train split seen as at evaluation: the feature bank of k-NN evaluators.
    bank_loader = build_loader(
        train_ds, d.eval_batch_size or d.batch_size * 2, train=False, transform=eval_tf, num_workers=workers,
        seed=cfg.engine.seed, distributed=dist.enabled, max_bad_fraction=d.max_bad_fraction,
    ) if pipeline is not None and hasattr(train_ds, "__len__") else None
    objective = build_objective(
        objective_name, model, objective_cfg, num_classes=choice.num_classes, label_smoothing=d.label_smoothing,
        bank_loader=bank_loader, class_weights=class_weights,
    )
    check_weighted(objective, objective_name, class_weights)
    # An objective that wants the un-normalised [0, 1] image gets it as batch["image_raw"].
    augment = BatchAugment(card.mean, card.std, color_jitter=d.color_jitter, re_prob=d.re_prob, re_mode=d.re_mode,
                           keep_raw=objective.needs_raw_image)
    if pipeline is not None:
        augment, mixup = pipeline[1], None
    cfg.engine.out_dir = out_dir
    cfg.model.name, cfg.data.img_size = choice.name, choice.img_size
    cfg.data.in_chans, cfg.data.num_classes = choice.in_chans, choice.num_classes
    run_info = {
        "model": choice.name, "img_size": choice.img_size, "in_chans": choice.in_chans,
        "num_classes": choice.num_classes, "classes": classes, "choice": choice.reason,
        "data_format": info.format, "n_train": info.n_train, "n_val": info.n_val,
        "mean": list(card.mean), "std": list(card.std), "crop_pct": crop_pct,
        "interpolation": card.interpolation, "val_fraction": d.val_fraction, "seed": cfg.engine.seed,
        "model_args": model.model_args,
        "objective": {"name": objective_name, **asdict(objective_cfg), "references": objective.references()},
        "bad_files": scan.lines() if scan is not None else [],  # "name: reason", each broken file once
        "class_counts": dict(zip(classes, info.class_counts)),
        "plan": plan.to_json() if plan is not None else None,
        "peft": peft_run_info(model),
        "data_path": {"store": path.store if store is not None else "off", "augment_on": path.augment_on},
    }
    budget = run_budget(cfg, start, plan, info.n_val)
    hooks = []
    if cfg.engine.plateau_patience is not None:  # imbalanced data balanced on purpose: watch balanced accuracy
        metric = "balanced_acc" if d.balance != "none" else None
        hooks.append(PlateauStop(cfg.engine.plateau_patience, cfg.engine.plateau_min_val, metric=metric))
    trainer = Trainer(
        objective, train_loader, val_loader, cfg=cfg.engine, optim_cfg=cfg.optim, sched_cfg=cfg.schedule,
        out_dir=out_dir, train_transform=TrainAugment(augment, mixup, geometry),
        eval_transform=Normalize(card.mean, card.std),
        config_to_save=to_dict(cfg), budget=budget, hooks=hooks,
    )
    return trainer, run_info


def train(
    cfg: TrainConfig, resume: bool | str = False, verbose: bool = True, force: bool = False, reschedule: bool = False
) -> dict:
    """Train as configured; returns the summary (also written to ``<out>/summary.json``).

    The run directory gets ``config.yaml``, ``run.json`` (model, classes, preprocessing),
    ``checkpoints/``, ``metrics.jsonl``, TensorBoard events, plots, ``bad_files.txt`` (the
    broken images left out, if any) and, at the end, ``model.safetensors`` (the final weights
    with their config and class names); a PEFT run (``peft.method``) also writes
    ``adapter.safetensors``, the trained weights alone, tied to the frozen base by its sha256. A directory that already holds a run needs ``resume``
    (continue it) or ``force`` (delete its files and start over). A resumed run refuses changes
    to the keys that shape the lr schedule unless ``reschedule`` (see :mod:`vitkit.rundir`).
    """
    start = time.monotonic()
    torch.manual_seed(cfg.engine.seed)  # the same model init for every process and every run
    is_main = init_distributed().is_main
    saved = saved_config(resume, cfg.engine.out_dir)
    if saved is not None:
        changes = check_resume_config(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg), reschedule=reschedule)
        if changes and verbose and is_main:
            print(f"--reschedule: the lr schedule is re-stretched from the current step ({'; '.join(changes)})")
    if cfg.engine.out_dir != "runs/default":
        removed = prepare_out_dir(cfg.engine.out_dir, resume=resume, force=force, is_main=is_main)
        if removed and verbose:
            print(f"--force: deleted the previous run's {', '.join(removed)} in {cfg.engine.out_dir}")
    trainer, run_info = build_run(cfg, verbose=verbose, start=start)
    run = RunDir(trainer.out_dir)
    if trainer.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config_file)
        run.write_run_info(run_info)
        if verbose:
            print(f"run dir: {run.path}")
    # The engine writes summary.json once; these are the fields only this function knows.
    trainer.summary_extra = lambda: _summary_extra(run_info, trainer)
    summary = trainer.fit(resume=resume)
    if trainer.is_main:
        save_weights(trainer.objective.export_model(), run.final_weights)
        save_run_adapter(trainer.objective.export_model(), run.path)  # PEFT runs: the small file
        if len(summary["bad_files"]) > len(run_info["bad_files"]):
            run.write_bad_files(summary["bad_files"])
    return summary


def _summary_extra(run_info: dict, trainer: Trainer) -> dict:
    bad = _all_bad_files(run_info["bad_files"], trainer)
    extra = {"model": run_info["model"], "out_dir": str(trainer.out_dir), "bad_files": bad, "skipped_files": len(bad)}
    extra["plateau_stop"] = plateau_record(trainer)  # None unless a plateau ended the run early
    if "task" in run_info:  # dense runs: what eval, predict and the summary line show depends on it
        extra["task"] = run_info["task"]
    if run_info.get("peft"):  # the CLI's summary points at the adapter file
        extra["peft"] = run_info["peft"]
    return extra


def _all_bad_files(scanned: list[str], trainer: Trainer) -> list[str]:
    """The broken files found up front, then those met during training (streaming data), each once."""
    lines = dict.fromkeys(scanned)
    for loader in (trainer.train_loader, trainer.val_loader):
        lines.update(dict.fromkeys(getattr(getattr(loader, "skips", None), "bad_files", [])))
    return list(lines)
