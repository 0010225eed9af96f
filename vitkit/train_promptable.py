"""The promptable-segmentation branch of :func:`vitkit.train.build_run`: SAM through the one Trainer.

``model.name`` names a SAM variant (:func:`vitkit.sam.list_sam_models`; ``sam_nano`` when unset,
the one that trains on a CPU), built at its own ``img_size`` (``data.img_size`` overrides it).
The data are instance masks (:func:`vitkit.data.prepare_data`, ``task="promptable"``); each image is
resized to the model's input (longest side, padded bottom/right as SAM's preprocessing) with its
masks in the loader workers, then normalised on the device. The ``sam`` objective prompts the
instances with points, boxes and correction clicks and evaluates ``point_miou``. Keys left unset
take SAM's training recipe (:func:`apply_sam_recipe`: AdamW at 8e-4, 250 warmup steps, no augmentation).

``model.init`` loads SAM weights whole (a SAM run or file), or other weights into the image
encoder's ViT: a vitkit MAE (or any ViT) run or file, whose keys are the plain ViT's; the neck,
the relative position tables, the prompt encoder and the mask decoder start fresh.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from .config import to_dict, user_keys
from .data import BatchAugment, Normalize, build_loader
from .engine import Trainer
from .errors import ConfigError, WeightsError
from .objectives import build_objective, objective_config
from .train_dense import default_out_dir, run_budget

DEFAULT_SAM = "sam_nano"
_DEFAULT_BATCH = 8  # SAM prompts up to max_masks instances per image: a batch of images is heavy
# SAM's AdamW recipe (Kirillov et al., 2023, appendix A): lr 8e-4 for 256 images per step after a linear
# warmup of 250 steps, weight decay 0.1.
SAM_LR, SAM_BATCH, SAM_WARMUP_STEPS, SAM_WEIGHT_DECAY = 8e-4, 256, 250, 0.1
# Keys a plain ViT checkpoint has that SAM's encoder does not, and the reverse.
_VIT_ONLY = ("norm.", "fc_norm.", "head.", "head_drop.")
_SAM_ONLY = ("neck.",)


def wants_promptable(cfg) -> bool:
    """True when the run trains promptable segmentation: ``--task promptable``, ``objective.name=sam``,
    or a SAM ``model.name`` on data whose task is not named."""
    if cfg.data.task == "promptable" or cfg.objective.get("name") == "sam":
        return True
    if cfg.data.task is None and cfg.model.name:
        from .sam import list_sam_models

        return cfg.model.name in list_sam_models()
    return False


def _weights_file(source: str) -> str:
    p = Path(source)
    if p.is_dir() and (p / "model.safetensors").is_file():
        return str(p / "model.safetensors")
    return source


def _encoder_vit(encoder):
    from .models.vitdet import ViTDet

    if isinstance(encoder, ViTDet):
        return encoder
    return next((m for m in encoder.modules() if isinstance(m, ViTDet)), encoder)


def init_sam(model, source: str, verbose: bool = True) -> str:
    """Fill ``model`` from ``source``: SAM weights whole, else a ViT's weights into the image encoder.

    Returns what was loaded ("sam" or "encoder"). Raises WeightsError when the ViT's keys do not fit
    the encoder (other than its final norm and head, which SAM's encoder lacks).
    """
    from .convert import load_weights
    from .weights_io import read_state_dict, unwrap

    path = _weights_file(source)
    state = unwrap(read_state_dict(path)[0])
    if any(k.startswith(("mask_decoder.", "prompt_encoder.")) for k in state):
        from .sam import load_sam

        loaded = load_sam(path)
        model.load_state_dict(loaded.state_dict())
        return "sam"
    report = load_weights(_encoder_vit(model.image_encoder), path, strict=False, verbose=verbose)
    missing = [k for k in report.missing if not (k.startswith(_SAM_ONLY) or k.endswith(("rel_pos_h", "rel_pos_w")))]
    unexpected = [k for k in report.unexpected if not k.startswith(_VIT_ONLY)]
    if missing or unexpected:
        raise WeightsError(
            f"model.init={source} does not fit the SAM image encoder: missing {missing[:6]}, not in the encoder "
            f"{unexpected[:6]}; give a ViT of the encoder's width, depth and patch size (a vitkit MAE run of the "
            "same backbone), or SAM weights"
        )
    return "encoder"


def build_sam_model(cfg, verbose: bool = True):
    """The SAM of ``model.name`` (``sam_nano`` when unset) with ``model.args`` and ``data.img_size``."""
    from .sam import create_sam, list_sam_models

    name = cfg.model.name or DEFAULT_SAM
    if name not in list_sam_models():
        raise ConfigError(f"model.name={name} is not a SAM model; promptable segmentation trains one of "
                          f"{', '.join(list_sam_models())}")
    kwargs = dict(cfg.model.args)
    kwargs.setdefault("drop_path_rate", cfg.model.drop_path_rate)  # the encoder's stochastic depth
    if cfg.data.img_size:
        kwargs["img_size"] = cfg.data.img_size
    try:
        model = create_sam(name, **kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot build {name} with model.args={dict(cfg.model.args)}: {e}") from e
    if cfg.model.init:
        what = init_sam(model, cfg.model.init, verbose=verbose)
        if verbose:
            print(f"initialised the {'model' if what == 'sam' else 'image encoder'} from {cfg.model.init}")
    return name, model


def _objective(cfg):
    section = dict(cfg.objective)
    name = section.get("name")
    if "objective.name" in user_keys(cfg) and name != "sam":
        raise ConfigError(f"objective.name={name} cannot train promptable segmentation: use objective.name=sam "
                          "(or drop objective.name)")
    # objective.* keys given without objective.name are the sam objective's (config.validate let them through).
    return objective_config({**section, "name": "sam"})


def apply_sam_recipe(cfg) -> None:
    """Set the keys the user left unset to SAM's training recipe (Kirillov et al., 2023, appendix A).

    AdamW at lr 8e-4, used as is at any batch (``optim.scale_lr`` false): the paper trains ViT-B on
    128 images and ViT-H on 256 per step at that same rate, and vitkit's rule (an lr per 512 images,
    scaled linearly) would cut it 32-fold at the default batch of 8. An ``optim.scale_lr=true`` given
    alone keeps vitkit's rule from the paper's batch (1.6e-3 per 512). Weight decay 0.1, a linear
    warmup of 250 steps (``schedule.warmup_steps``) and no data augmentation (``data.hflip`` 0), as
    the paper; under a time budget the warmup ends by a quarter of it at the latest (vitkit's cap for
    every run). The decay is vitkit's default cosine (``schedule.name``), where the paper divides the
    lr by 10 at 67% and again at 96% of its steps: vitkit's schedules follow a time budget's progress,
    and a step schedule is not among them. The batch is 8 images: each carries up to
    ``objective.max_masks`` prompted instances.
    """
    keys = user_keys(cfg)
    if "data.batch_size" not in keys:
        cfg.data.batch_size = _DEFAULT_BATCH
    if "data.hflip" not in keys:
        cfg.data.hflip = 0.0
    if "optim.lr" not in keys:
        scaled = "optim.scale_lr" in keys and cfg.optim.scale_lr
        cfg.optim.lr = SAM_LR * 512 / SAM_BATCH if scaled else SAM_LR
        cfg.optim.scale_lr = scaled
    if "optim.weight_decay" not in keys:
        cfg.optim.weight_decay = SAM_WEIGHT_DECAY
    if not {"schedule.warmup_steps", "schedule.warmup_epochs"} & keys:
        cfg.schedule.warmup_steps = SAM_WARMUP_STEPS
    if "model.drop_path_rate" not in keys:
        cfg.model.drop_path_rate = 0.0  # the SAM registry's: no stochastic depth unless asked (and config.yaml says so)


def build_promptable_run(cfg, data, dist, verbose: bool = True, start: float | None = None):
    """:func:`vitkit.train.build_run` for instance-mask data (a :class:`~vitkit.data.stage.DataStage`)."""
    from .data.instances import InstanceTransform

    d = cfg.data
    show = verbose and dist.is_main
    objective_name, objective_cfg = _objective(cfg)
    apply_sam_recipe(cfg)
    name, model = build_sam_model(cfg, verbose=show)
    img_size = int(model.img_size)
    # SAM keeps its statistics in 0..255 units; the batch normalisation takes them in 0..1.
    mean = [float(v) / 255 for v in torch.as_tensor(model.pixel_mean).flatten().tolist()]
    std = [float(v) / 255 for v in torch.as_tensor(model.pixel_std).flatten().tolist()]
    if show:
        print(f"promptable segmentation: {name} at {img_size} px on {data.reason}")
    workers = d.num_workers if d.num_workers is not None else min(4, os.cpu_count() or 1)
    common = dict(num_workers=workers, seed=cfg.engine.seed, distributed=dist.enabled,
                  max_bad_fraction=d.max_bad_fraction)
    train_loader = build_loader(data.train, d.batch_size, train=True,
                                transform=InstanceTransform(img_size, hflip=d.hflip), **common)
    val_loader = build_loader(data.val, d.eval_batch_size or d.batch_size, train=False,
                              transform=InstanceTransform(img_size), **common)
    if len(train_loader) < cfg.engine.accum_steps:
        raise ConfigError(
            f"{len(data.train)} training images make {len(train_loader)} full batches of data.batch_size="
            f"{d.batch_size} per process, fewer than one optimizer step of engine.accum_steps="
            f"{cfg.engine.accum_steps}: lower data.batch_size (or accum_steps), or train on more images"
        )
    objective = build_objective(objective_name, model, objective_cfg, seed=cfg.engine.seed)
    out_dir = cfg.engine.out_dir if cfg.engine.out_dir != "runs/default" else default_out_dir(cfg, name)
    cfg.engine.out_dir = out_dir
    cfg.model.name, cfg.data.img_size, cfg.data.in_chans, cfg.data.task = name, img_size, 3, "promptable"
    cfg.objective = {"name": objective_name, **asdict(objective_cfg)}
    info = data.info
    run_info = {
        "task": "promptable", "model": name, "img_size": img_size, "in_chans": 3,
        "num_classes": info.num_classes, "classes": list(info.classes), "choice": data.reason,
        "data_format": info.format, "n_train": info.n_train, "n_val": info.n_val, "mean": mean, "std": std,
        "val_fraction": d.val_fraction, "seed": cfg.engine.seed, "model_args": model.model_args,
        "objective": {"name": objective_name, **asdict(objective_cfg), "references": objective.references()},
        "bad_files": [], "plan": None,
    }
    trainer = Trainer(
        objective, train_loader, val_loader, cfg=cfg.engine, optim_cfg=cfg.optim, sched_cfg=cfg.schedule,
        out_dir=out_dir, train_transform=BatchAugment(mean, std, color_jitter=d.color_jitter, re_prob=0.0),
        eval_transform=Normalize(mean, std), config_to_save=to_dict(cfg), budget=run_budget(cfg, start, None, info.n_val),
    )
    return trainer, run_info
