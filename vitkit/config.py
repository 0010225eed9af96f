"""The run configuration: dataclass defaults -> recipe YAML -> ``key=value`` overrides.

Every default lives in a dataclass here or in :mod:`vitkit.engine.config`. A recipe file
and command-line overrides are merged on top with OmegaConf's structured configs, which
reject unknown keys and wrong types by name. The resolved config is written to the run dir.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data.rand_augment import parse_rand_augment
from .engine.budget import parse_duration
from .engine.config import EngineConfig, OptimConfig, ScheduleConfig
from .errors import ConfigError, PathNotFoundError
from .objectives import objective_config
from .peft.config import PeftConfig


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented.

    ``path`` is any format ``vitkit.data.build_dataset`` reads, or ``shapes`` (built in).
    ``img_size``/``in_chans``/``num_classes`` of None are taken from the data and the model.
    ``task`` None detects it from the data (class folders: classify; mask folders: segment; depth
    maps: depth; see ``vitkit.data.task.detect_task``); naming one wins. ``ignore_index`` None
    takes the data's (the mask value that marks unlabelled pixels: CamVid 11, VOC 255). For dense
    tasks ``img_size`` is the side of the square training crop; for detection the long side images
    are resized to (keeping their aspect).
    """

    path: str = "shapes"
    task: str | None = None
    ignore_index: int | None = None
    img_size: int | None = None
    in_chans: int | None = None
    num_classes: int | None = None
    val_fraction: float = 0.1
    batch_size: int = 128
    eval_batch_size: int | None = None
    num_workers: int | None = None  # None: min(4, CPU count)
    # Train augmentation (DeiT recipe by default).
    scale_min: float = 0.08
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.0
    re_prob: float = 0.25
    re_mode: str = "pixel"  # random erasing fill: per-pixel N(0, 1) noise, or "const" zeros
    mixup: float = 0.8
    cutmix: float = 1.0
    mix_prob: float = 1.0
    label_smoothing: float = 0.1
    repeated_aug: int = 0  # >1: DeiT repeated augmentation with that many repeats
    # Imbalanced classes: "sampler" draws every class equally often, "loss" weights the cross-entropy by
    # inverse class frequency (scikit-learn's "balanced"); see vitkit.data.balance. "none": the data as it is.
    balance: str = "none"  # none | sampler | loss
    crop_pct: float | None = None  # None: the model card's
    max_bad_fraction: float = 0.05
    # Where the training images are decoded and augmented (see vitkit.plan_data). store: auto | memory | mmap |
    # off: decode every image once into memory, or into a memory-mapped file in the run's cache; augment_on:
    # auto | workers | device: crops, flips and RandAugment per image in the loader workers, or batched on the
    # training device. auto: the plan's choice on runs it plans, else the worker path without a store.
    store: str = "auto"
    augment_on: str = "auto"
    store_max_gb: float | None = None  # the largest store; None: half the memory available at the start


@dataclass
class ModelConfig:
    """Which network, and from which weights.

    ``name`` None lets vitkit choose from the data (see ``vitkit.train.choose_model``).
    ``init`` is any weights ``load_weights`` accepts (file, folder, hub id) to fine-tune
    from; the head is replaced when the class count differs. For dense tasks ``name`` is the
    backbone, ``head`` the registered dense head (``vitkit.dense.list_heads()``; None: the plan's)
    and ``head_args`` its constructor arguments. For detection ``head`` is the detector
    (``vitkit.detect.list_detectors()``: detr, deformable_detr, yolos, vitdet_fcos), ``name`` its
    backbone (None: the plan's, or the detector's own) and ``head_args`` the detector's arguments.
    """

    name: str | None = None
    init: str | None = None
    drop_path_rate: float = 0.1
    args: dict = field(default_factory=dict)  # other constructor arguments
    head: str | None = None
    head_args: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Parameter-efficient fine-tuning: ``peft.method`` None (or ``none``) trains every weight.
    peft: PeftConfig = field(default_factory=PeftConfig)
    # --- objective section (engine helper): ``objective.name`` picks a registered objective,
    # its other keys are that objective's config (see vitkit.objectives; checked in validate).
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "supervised"})


def recipe_path(recipe: str) -> Path:
    """A recipe name (``deit_tiny_cifar10``) or a path to a YAML file."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    name = recipe if recipe.endswith((".yaml", ".yml")) else recipe + ".yaml"
    packaged = resources.files("vitkit") / "recipes" / name
    if packaged.is_file():
        return Path(str(packaged))
    raise PathNotFoundError(f"no recipe {recipe!r}: not a YAML file, and not one of {list_recipes()}")


def list_recipes() -> list[str]:
    folder = resources.files("vitkit") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def auto_recipe(overrides: list[str] | tuple[str, ...] = ()) -> str | None:
    """The recipe used when none is named: ``shapes_quick`` for the built-in shapes data."""
    path = "shapes"
    for o in overrides:
        if o.startswith("data.path="):
            path = o.split("=", 1)[1]
    return "shapes_quick" if path.split(":")[0] == "shapes" else None


def _set_keys(tree, prefix: str = "") -> set[str]:
    """``section.name`` keys in a nested dict (deeper keys count as their two-level parent)."""
    out = set()
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key.count(".") < 1:
            out |= _set_keys(v, key + ".")
        else:
            out.add(key)
    return out


def user_keys(cfg: TrainConfig) -> frozenset[str]:
    """The ``section.name`` keys set by the recipe or the overrides of :func:`load_config`."""
    return getattr(cfg, "_user_keys", frozenset())


def uses_plan(cfg: TrainConfig) -> bool:
    """True when :func:`vitkit.train` fills unset keys from the data-aware plan (:mod:`vitkit.plan`)."""
    return bool(getattr(cfg, "_use_plan", False))


def load_config(
    recipe: str | None = None, overrides: list[str] | tuple[str, ...] = (), plan: bool = True
) -> TrainConfig:
    """Defaults, then the recipe, then ``key=value`` overrides; returns a validated TrainConfig.

    With no recipe, the built-in shapes data gets ``shapes_quick`` (see :func:`auto_recipe`);
    other data gets the data-aware plan (:mod:`vitkit.plan`) at train time: every key that the
    overrides do not set is chosen from the dataset scan and a short calibration. ``plan=False``
    keeps the dataclass defaults for those keys instead.
    """
    use_plan = plan and recipe is None and auto_recipe(overrides) is None
    if recipe is None:
        recipe = auto_recipe(overrides)
    base = OmegaConf.structured(TrainConfig)
    layers = [base]
    if recipe:
        layers.append(OmegaConf.load(recipe_path(recipe)))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value (e.g. engine.epochs=10), got {bad}")
    layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as e:
        raise ConfigError(_config_error(e)) from None
    cfg: TrainConfig = OmegaConf.to_object(merged)
    keys = set()
    for layer in layers[1:]:
        keys |= _set_keys(OmegaConf.to_container(layer))
    validate(cfg, objective_named="objective.name" in keys)
    # Not dataclass fields: they steer the plan and are not saved with the config.
    cfg._user_keys = frozenset(keys)
    cfg._use_plan = use_plan
    return cfg


def _config_error(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    if "Key" in msg and "not in" in msg:
        return f"unknown config key {key!r}: {msg}. See `vitkit train --show-config` for all keys"
    return f"bad value for config key {key!r}: {msg}"


def validate(cfg: TrainConfig, objective_named: bool = True) -> None:
    """Check ranges, choices and the objective section; a bad value is a ConfigError naming the key.

    ``objective_named`` False: the user set objective keys without ``objective.name``; they may
    belong to the dense objective the data will pick (``segment``/``depth``), checked then.
    """
    _validate_choices(cfg)
    d, e = cfg.data, cfg.engine
    if d.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {d.batch_size}")
    if not 0 < d.scale_min <= 1:
        raise ConfigError(f"data.scale_min must be in (0, 1], got {d.scale_min}")
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    if d.re_mode not in ("pixel", "const"):
        raise ConfigError(f"data.re_mode must be pixel or const, got {d.re_mode!r}")
    if e.epochs < 1:
        raise ConfigError(f"engine.epochs must be >= 1, got {e.epochs}")
    if e.amp not in ("auto", "bf16", "fp16", "fp32", "none"):
        raise ConfigError(f"engine.amp must be auto, bf16, fp16 or fp32 (none), got {e.amp!r}")
    parse_duration(e.time_budget)  # a bad duration fails here, before any data is read
    _validate_peft(cfg)
    if d.task is not None:
        from .data.task import TASKS

        if d.task not in TASKS:
            raise ConfigError(f"data.task must be one of {', '.join(TASKS)} (or unset: detected), got {d.task!r}")
    if d.ignore_index is not None and not 0 <= d.ignore_index <= 255:
        raise ConfigError(f"data.ignore_index must be a mask value in [0, 255], got {d.ignore_index}")
    try:
        objective_config(cfg.objective)  # unknown objective or key -> ConfigError naming its keys
    except ConfigError:
        if objective_named or not any(_fits_objective(cfg.objective, t) for t in TASK_OBJECTIVES):
            raise


# The objective a dense task trains with when objective.name is not set.
DENSE_OBJECTIVES = ("segment", "depth")
# Objectives the data's task picks when objective.name is not set (their keys may be set without it).
TASK_OBJECTIVES = DENSE_OBJECTIVES + ("detect", "clip", "siglip", "sam")


def _fits_objective(section: dict, name: str) -> bool:
    try:
        objective_config({**section, "name": name})
    except ConfigError:
        return False
    return True


# (key, allowed values) of the string choices; checked here so a typo fails before any work.
_CHOICES = (
    ("engine.nonfinite", ("stop", "skip")),
    ("schedule.name", ("cosine", "onecycle", "constant")),
    ("optim.name", ("adamw", "sgd")),
    ("data.balance", ("none", "sampler", "loss")),
    ("data.store", ("auto", "memory", "mmap", "off")),
    ("data.augment_on", ("auto", "workers", "device")),
)


def _get(cfg: TrainConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _validate_choices(cfg: TrainConfig) -> None:
    """Ranges and choices the engine and the data pipeline would otherwise reject mid-setup."""
    if cfg.data.store == "False":  # YAML reads a bare `off` (data.store=off) as false
        cfg.data.store = "off"
    for key, allowed in _CHOICES:
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {_get(cfg, key)!r}")
    d, e = cfg.data, cfg.engine
    if e.device != "auto" and e.device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"engine.device must be auto, cpu or cuda (or cuda:N), got {e.device!r}")
    checks = (
        ("engine.accum_steps", e.accum_steps >= 1, ">= 1"),
        ("engine.eval_every", e.eval_every >= 1, ">= 1"),
        ("engine.ema_decay", e.ema_decay is None or 0 <= e.ema_decay <= 1, "in [0, 1]"),
        ("data.img_size", d.img_size is None or d.img_size > 0, "positive"),
        ("data.in_chans", d.in_chans in (None, 1, 3), "1 or 3"),
        ("data.num_classes", d.num_classes is None or d.num_classes >= 1, ">= 1"),
        ("data.crop_pct", d.crop_pct is None or 0 < d.crop_pct <= 1, "in (0, 1]"),
        ("data.mixup", d.mixup >= 0, ">= 0"),
        ("data.cutmix", d.cutmix >= 0, ">= 0"),
        ("data.label_smoothing", 0 <= d.label_smoothing < 1, "in [0, 1)"),
        ("data.max_bad_fraction", 0 <= d.max_bad_fraction <= 1, "in [0, 1]"),
        ("data.repeated_aug", d.repeated_aug >= 0, ">= 0"),
        ("data.store_max_gb", d.store_max_gb is None or d.store_max_gb > 0, "> 0 (or unset)"),
        ("optim.lr", cfg.optim.lr > 0, "> 0"),
        ("engine.plateau_patience", e.plateau_patience is None or 0 < e.plateau_patience <= 1, "in (0, 1]"),
        ("engine.plateau_min_val", e.plateau_min_val >= 0, ">= 0"),
    )
    for key, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{key} must be {rule}, got {_get(cfg, key)!r}")
    if d.auto_augment:
        try:
            parse_rand_augment(d.auto_augment)
        except ValueError as err:
            raise ConfigError(f"data.auto_augment: {err}") from None


# Values of ``peft.method`` that mean "no PEFT": a user's explicit way to keep the plan from choosing one.
PEFT_OFF = ("none", "off", "full")


def _validate_peft(cfg: TrainConfig) -> None:
    method = cfg.peft.method
    if isinstance(method, str) and method.strip().lower() in PEFT_OFF:
        cfg.peft.method = None  # recorded as set by the user, so the plan leaves it off
    cfg.peft.check()


def to_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), path)
