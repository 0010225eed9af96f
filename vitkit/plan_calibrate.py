"""The plan's records and measurements (:mod:`vitkit.plan` decides from them).

Records: a :class:`Candidate` model, the :class:`Calibration` of this machine, the :class:`Plan`
itself (values with reasons) and how it meets the config (:func:`user_values`, :func:`apply_plan`).
Measurements: the train and evaluation speed of a candidate model, the cost of decoding and
cropping an image; whether pretrained weights can be had *and used* (cached or downloaded, read,
fitted to the data's channels and classes: any failure means training from scratch, with the
reason in one line); and the architecture a user's ``model.init`` records, so that the run builds
the model those weights fit.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .convert import load_weights
from .data.transforms import TrainTransform
from .engine.runtime import autocast
from .errors import VitkitError
from .models import create_model, get_model_card
from .rundir import resolve_weights
from .weights_io import is_hub_id, read_metadata

PRETRAINED_MODEL = "deit_tiny_patch16_224"
# Build arguments the run sets from the data and the config, never from an init file's record.
_RUN_ARGS = ("num_classes", "img_size", "in_chans", "drop_path_rate")


@dataclass(frozen=True)
class Candidate:
    """A model at a resolution; ``args`` are extra constructor arguments."""

    name: str
    img_size: int
    args: tuple[tuple[str, object], ...] = ()
    pretrained: str | None = None  # hub id to fine-tune from

    @property
    def key(self) -> str:
        return f"{self.name}@{self.img_size}"


@dataclass
class Calibration:
    """Measured on the machine at hand: training img/s per candidate key, seconds to decode and crop one image."""

    device: str
    img_per_s: dict[str, float]
    decode_s: float
    pretrained: str | None = None  # hub id of weights that load into the planned model (cached or reachable)
    eval_img_per_s: dict[str, float] = field(default_factory=dict)  # forward-only, at twice the batch
    pretrained_error: str | None = None  # why pretrained weights that were looked for cannot be used
    init: Candidate | None = None  # the architecture the user's model.init records


@dataclass
class Plan:
    """Chosen values by dotted config key, each with its reason, plus warnings."""

    values: dict[str, object] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    img_per_s: float | None = None  # expected training rate of the chosen model, images and all
    eval_img_per_s: float | None = None  # its measured evaluation rate (for the budget's end reserve)

    def set(self, key: str, value, reason: str) -> None:
        self.values[key] = value
        self.reasons[key] = reason

    def to_json(self) -> dict:
        return {k: {"value": v, "reason": self.reasons[k]} for k, v in self.values.items()}

    def lines(self) -> list[str]:
        out = ["plan (override any key with key=value):"]
        for k, v in self.values.items():
            out.append(f"  {k}={v}  # {self.reasons[k]}")
        out += [f"  note: {n}" for n in self.notes]
        return out


def user_values(cfg, keys) -> dict[str, object]:
    """``{dotted key: value in cfg}`` for the keys the user set."""
    out = {}
    for k in keys:
        obj = cfg
        try:
            for part in k.split("."):
                obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
        except (AttributeError, KeyError):
            continue
        out[k] = obj
    return out


def apply_plan(cfg, plan: Plan) -> None:
    """Write the plan's values into ``cfg`` (the plan holds no user-set key): ``objective.*`` keys into the
    objective section (a dict of that objective's own keys), a key such as ``model.head_args.init_logit_bias``
    into the dict field it names. Every task's plan is written by this one function."""
    for key, value in plan.values.items():
        section, name = key.split(".", 1)
        if section == "objective":
            cfg.objective[name] = value
        elif "." in name:
            field, item = name.split(".", 1)
            getattr(getattr(cfg, section), field)[item] = value
        else:
            setattr(getattr(cfg, section), name, value)


def first_stride(name: str, img_size: int, args=()) -> int:
    """Model ``name``'s first feature stride at ``img_size``, asked of the model itself (built on the meta device)."""
    with torch.device("meta"):
        model = create_model(name, img_size=img_size, **dict(args))
    return model.feature_info[0]["reduction"]


def find_pretrained(model_name: str = PRETRAINED_MODEL, timeout_s: float = 3.0) -> str | None:
    """The hub id of ``model_name``'s weights if they are in the local HF cache or the hub answers in time."""
    hub_id = get_model_card(model_name).hub_id
    if not hub_id:
        return None
    try:
        from huggingface_hub import HfApi, constants, try_to_load_from_cache
    except ImportError:
        return None
    for name in ("model.safetensors", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(hub_id, name), str):
            return hub_id
    if constants.HF_HUB_OFFLINE:
        return None
    try:
        HfApi().model_info(hub_id, timeout=timeout_s)
    except Exception:  # any failure (no network, DNS, timeout, HTTP error) means: not reachable
        return None
    return hub_id


def usable_pretrained(model_name: str, in_chans: int, num_classes: int,
                      timeout_s: float = 3.0) -> tuple[str | None, str | None]:
    """``(hub id, None)`` when ``model_name``'s published weights are cached or reachable and load into
    the model as this data needs it (``in_chans`` channels, a new head of ``num_classes``); else
    ``(None, reason)``, one line: not cached and the hub unreachable, a truncated or corrupt file,
    weights that do not fit. The weights are read here, before the plan relies on them, so that a
    broken file means training from scratch rather than a failed run.
    """
    hub_id = find_pretrained(model_name, timeout_s)
    if hub_id is None:
        return None, f"no {model_name} weights in the hub cache, and the hub is unreachable"
    try:
        load_weights(create_model(model_name, num_classes=num_classes, in_chans=in_chans), hub_id, verbose=False)
    except Exception as e:  # noqa: BLE001 - whatever breaks the pretrained path, training from scratch still works
        reason = str(e).splitlines()[0] if str(e) else "no message"
        return None, f"pretrained {hub_id} unusable ({type(e).__name__}: {reason})"
    return hub_id, None


def init_candidate(source) -> Candidate | None:
    """The architecture a ``model.init`` source records, at the size it was built for: a vitkit weights
    file, run or checkpoint (its ``model_name`` and ``model_args``), or a hub id that a registered
    model publishes (at its card's size). None when the source does not say (other weights): the
    plan's own choice is built, and the load reports in full what does not fit.
    """
    if not source:
        return None
    if not Path(str(source)).expanduser().exists():
        if not is_hub_id(str(source)):
            return None
        from .source import _hub_card_name

        name = _hub_card_name(str(source))
        return Candidate(name, get_model_card(name).input_size[1]) if name else None
    try:
        weights, _ = resolve_weights(source, what=f"model.init={source}")
        meta = read_metadata(weights) if weights.is_file() and weights.suffix == ".safetensors" else {}
        args = json.loads(meta.get("model_args") or "{}")
        card = get_model_card(meta["model_name"]) if meta.get("model_name") else None
    except (VitkitError, ValueError):  # the build reads the source again and says what is wrong with it
        return None
    if card is None or not isinstance(args, dict):
        return None
    size = args.get("img_size") or card.input_size[1:]
    size = max(size) if isinstance(size, (list, tuple)) else size
    extra = {k: v for k, v in args.items() if k not in _RUN_ARGS and card.config.get(k) != v}
    return Candidate(card.name, int(size), tuple(sorted(extra.items())))


def time_model(name: str, img_size: int, args: dict, in_chans: int, num_classes: int, batch: int, device,
               amp_dtype, min_s: float = 1.0, max_steps: int = 8) -> tuple[float, float]:
    """(training, evaluation) img/s of model ``name`` at ``img_size``: two untimed steps, then timed forward+backward+update
    steps for at least ``min_s`` seconds (at least 3, at most ``max_steps`` steps); then forward-only
    passes at twice the batch, as the evaluation runs, for a third of that. Each rate is taken from the
    median step, so a step slowed by another process on the machine (a browser, an editor's indexer)
    does not make the plan think the machine several times slower than it trains."""
    model = create_model(name, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                         **args).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, in_chans, img_size, img_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        with autocast(amp_dtype, device):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def median_s(fn, window_s: float) -> float:
        times, t_start = [], time.perf_counter()
        while len(times) < 3 or (len(times) < max_steps and time.perf_counter() - t_start < window_s):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    step()
    step()  # the first steps pay for kernel selection and allocation
    sync()
    train_rate = batch / median_s(step, min_s)

    model.eval()
    x2 = torch.cat([x, x])
    with torch.no_grad(), autocast(amp_dtype, device):
        model(x2)
        eval_rate = 2 * batch / median_s(lambda: model(x2), min_s / 3)
    return train_rate, eval_rate


def time_decode(dataset, img_size: int, in_chans: int, n: int = 32) -> float:
    """Seconds to read, decode and random-crop one image of ``dataset`` (median-free mean over ``n``)."""
    if not hasattr(dataset, "__len__") or len(dataset) == 0:
        return 0.0
    tf = TrainTransform(img_size, in_chans, scale=(0.35, 1.0))
    idx = np.random.default_rng(0).permutation(len(dataset))[:n]
    t0 = time.perf_counter()
    for i in idx:
        tf(dataset[int(i)][0])
    return (time.perf_counter() - t0) / len(idx)
