"""`vitkit.pretrain(method, data, overrides)`: self-supervised pretraining through the one engine.

A method is a registered objective (``mae``, ``dino``, ``ibot``, ``simclr``, ``mocov3``); this
module only gives each its starting config, on top of which the user's ``key=value`` overrides
apply, then runs :func:`vitkit.train.train`. Labels are never used for training; when the data
has them (the built-in shapes do) the run reports k-NN accuracy of the features on the
validation split and keeps the best checkpoint by it.

>>> from vitkit.pretrain import pretrain
>>> summary = pretrain("dino", "/data/cifar10", ["engine.time_budget=30m"])
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import TrainConfig, load_config
from .errors import ConfigError

METHODS = ("mae", "dino", "ibot", "simclr", "mocov3")

# Every method: no label-based mixing or smoothing, no RandAugment or erasing (each method
# brings its own views), k-NN every 5 epochs.
_COMMON = {
    "data.auto_augment": None,
    "data.re_prob": 0.0,
    "data.mixup": 0.0,
    "data.cutmix": 0.0,
    "data.label_smoothing": 0.0,
    "data.repeated_aug": 0,
    "model.drop_path_rate": 0.0,
    "schedule.name": "cosine",
    "schedule.warmup_epochs": 1.0,
    "engine.epochs": 20,
    "engine.eval_every": 5,
}

# The papers' optimiser settings (lr per global batch of 512, scaled linearly by the engine).
_METHOD = {
    # MAE's loss never reaches the backbone's pooling head (fc_norm): DDP must allow unused parameters.
    "mae": {"optim.lr": 3.0e-4, "optim.weight_decay": 0.05, "optim.betas": [0.9, 0.95],
            "engine.find_unused_parameters": True},
    # DINO and iBOT clip each parameter's gradient norm to 3 on its own (their clip_gradients); the
    # head's last layer gets no gradient while frozen, which DDP must allow.
    "dino": {"optim.lr": 1.0e-3, "optim.weight_decay": 0.04, "optim.clip_grad": 3.0, "optim.clip_mode": "per_param",
             "engine.find_unused_parameters": True},
    "ibot": {"optim.lr": 1.0e-3, "optim.weight_decay": 0.04, "optim.clip_grad": 3.0, "optim.clip_mode": "per_param",
             "engine.find_unused_parameters": True},
    "simclr": {"optim.lr": 2.0e-3, "optim.weight_decay": 0.05},
    "mocov3": {"optim.lr": 3.0e-4, "optim.weight_decay": 0.1},
}


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ",".join(str(x) for x in v) + "]"
    return str(v)


def pretrain_overrides(method: str, overrides: Sequence[str] = ()) -> list[str]:
    """The ``key=value`` list of a ``method`` run: its defaults, then ``overrides`` (which win)."""
    if method not in METHODS:
        raise ConfigError(f"unknown pretraining method {method!r}: use one of {', '.join(METHODS)}")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value (e.g. engine.epochs=10), got {bad}")
    given = {o.split("=", 1)[0] for o in overrides}
    if any(k.startswith("objective.name") for k in given):
        raise ConfigError("vitkit pretrain sets objective.name from --method; drop objective.name=...")
    defaults = {**_COMMON, **_METHOD[method]}
    if method in ("mae", "ibot") and "model.name" not in given:
        # A conv stem sees across patch borders, so visible tokens would carry masked pixels.
        defaults["model.args.conv_stem"] = False
    base = [f"{k}={_value(v)}" for k, v in defaults.items() if k not in given]
    return [*base, f"objective.name={method}", *overrides]


def pretrain_config(method: str, data: str | None = None, overrides: Sequence[str] = (),
                    recipe: str | None = None) -> TrainConfig:
    """The validated config of a pretraining run (no data-aware plan: that plans supervised runs)."""
    from .objectives import objective_config

    extra = [f"data.path={data}"] if data else []
    cfg = load_config(recipe, pretrain_overrides(method, [*extra, *overrides]), plan=False)
    objective_config(cfg.objective)  # unknown objective.* keys fail now, not after the data scan
    return cfg


def pretrain(method: str, data: str | None = None, overrides: Sequence[str] = (), **train_kw) -> dict:
    """Pretrain with ``method`` on ``data`` (None: the built-in shapes); returns the run summary.

    ``train_kw`` goes to :func:`vitkit.train.train` (``resume``, ``force``, ``verbose``).
    """
    from .train import train

    return train(pretrain_config(method, data, overrides), **train_kw)
