"""The data-aware plan for detection data: what ``vitkit train --data raccoon/`` trains with no flags.

The counterpart of :mod:`vitkit.plan` and :mod:`vitkit.plan_dense` for boxes, stated in the same
``key=value  # reason`` lines. Every rule reads only the data's statistics (training images,
their typical size, boxes per image, the median box's share of the image) and a short timing
on this machine, so no dataset is special-cased:

- **Detector.** DETR-family detectors learn their set prediction slowly (DETR: 500 epochs on
  COCO's 118k images; Deformable DETR: 50): they are the choice with a GPU and at least
  ``SET_MIN_IMAGES`` training images, Deformable DETR first (10x faster convergence, better on
  small objects). Otherwise the ViTDet detector ``vitdet_fcos`` (simple pyramid + FCOS head):
  dense per-location targets give every image many positive samples, so it learns from a few
  hundred images in minutes.
- **Backbone.** With ``model.init`` weights that name their architecture, that backbone (and
  those weights); for photos, DeiT-Tiny with its ImageNet weights when they are cached or the hub
  answers (as the classification plan); else the detector's own on a GPU, and ``CPU_BACKBONE``
  (ViTDet-Tiny, from scratch) on a CPU.
- **Image size.** The long side of the typical image, in multiples of the detector's stride,
  at most ``MAX_SIDE`` (for the device), and no larger than needed for the median box to span
  ``OBJECT_PX`` pixels (large objects train at a lower resolution, so more epochs fit); at least
  ``MIN_STRIDES`` strides, unless the images themselves are smaller (they are never upsampled
  beyond the next multiple of the stride).
- **Length.** On a CPU the dense plan's budget (20 min up to 1,000 images, proportionally more
  beyond, at most an hour); on a GPU epochs (more passes for fewer images). The batch gives an
  epoch at least 30 steps (:func:`~vitkit.plan_dense.planned_dense_batch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .engine.budget import parse_duration
from .engine.runtime import resolve_amp
from .plan import MEDIUM_SIDE, Calibration, Plan, apply_plan, user_values
from .plan_calibrate import PRETRAINED_MODEL, find_pretrained
from .plan_dense import (
    dense_budget_s,
    planned_dense_batch,
    time_transform,
    train_eval_rates,
)
from .plan_eval import set_run_length

ONE_STAGE = "vitdet_fcos"
SET_DETECTORS = ("deformable_detr", "detr")  # preferred first
SET_MIN_IMAGES = 10_000
PHOTO_SIDE = MEDIUM_SIDE  # larger images are photos: ImageNet weights help when they are at hand
CPU_BACKBONE = "vitdet_tiny_patch16_224"
MAX_SIDE = {"cpu": 384, "cuda": 800}
OBJECT_PX = 96  # the median box's side at the planned size: enough pixels to place its edges
MIN_STRIDES = 4
CALIB_BATCH = 2
# AdamW lr per image batch of 16, square-root scaled to the planned batch (DETR: 1e-4 at 64, from
# pretrained backbones); a from-scratch backbone learns faster.
DET_LR_16 = {"finetune": 5e-5, "scratch": 2e-4}
SET_CLIP, ONE_STAGE_CLIP = 0.1, 1.0  # DETR clips at 0.1; FCOS-style heads at a looser norm
DET_SCALE_MIN = 0.5  # random resize-crop keeps at least this share of the image side


@dataclass
class DetectInfo:
    """What the plan reads of detection data (``stats()`` of the training split and the counts)."""

    typical_size: tuple[int, int]
    n_train: int
    n_val: int
    in_chans: int
    num_classes: int
    classes: tuple[str, ...] = ()
    format: str = ""
    boxes_per_image: float = 0.0
    box_area_frac: float = 0.0
    notes: tuple[str, ...] = ()
    reason: str = ""


@dataclass
class DetectChoice:
    """The detector, its backbone and training image size (long side), with the sentence that says why."""

    detector: str
    backbone: str | None
    img_size: int
    in_chans: int
    num_classes: int
    reason: str


@dataclass
class DetectCalibration(Calibration):
    """A :class:`~vitkit.plan.Calibration` of the planned detector: its stride and the size it was timed at."""

    stride: int = 16
    img_size: int = 0
    params: int = 0


def _get(obj, key, default=None):
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def detect_info(data) -> DetectInfo:
    """The plan's view of a detection :class:`~vitkit.data.stage.DataStage` (its ``info`` and the
    training split's ``stats()``: typical size, boxes per image, median box area share)."""
    info, train = data.info, data.train
    stats = train.stats() if callable(getattr(train, "stats", None)) else {}
    size = _get(info, "typical_size") or stats.get("typical_size") or (224, 224)
    n_train = _get(info, "n_train")
    n_val = _get(info, "n_val")
    return DetectInfo(
        typical_size=(int(size[0]), int(size[1])),
        n_train=int(n_train if n_train is not None else len(train)),
        n_val=int(n_val if n_val is not None else len(data.val)),
        in_chans=int(_get(info, "in_chans") or stats.get("in_chans") or train.in_chans),
        num_classes=int(train.num_classes), classes=tuple(str(c) for c in train.classes),
        format=str(_get(info, "format") or getattr(train, "format", "")),
        boxes_per_image=float(stats.get("boxes_per_image", _get(info, "boxes_per_image", 0.0)) or 0.0),
        box_area_frac=float(stats.get("box_area_frac", _get(info, "box_area_frac", 0.0)) or 0.0),
        notes=tuple(dict.fromkeys(n for n in (getattr(train, "note", None), *(_get(info, "notes") or ())) if n)),
        reason=str(getattr(data, "reason", "") or ""),
    )


def served(name: str) -> bool:
    from .detect import list_detectors

    return name in list_detectors()


def choose_detector(info: DetectInfo, device: str) -> tuple[str, str]:
    """(detector name, why): a DETR-family detector for large data on a GPU, else the ViTDet FCOS detector."""
    from .detect import list_detectors

    known = list_detectors()
    if device == "cuda" and info.n_train >= SET_MIN_IMAGES:
        for name in SET_DETECTORS:
            if name in known:
                return name, (f"{info.n_train:,} training images on a GPU (>= {SET_MIN_IMAGES:,}): a set-prediction "
                              "detector has the data and the passes to converge")
    fallback = ONE_STAGE if ONE_STAGE in known else (known[0] if known else ONE_STAGE)
    why = (f"{info.n_train:,} training images" + (" on a CPU" if device != "cuda" else "") +
           ": dense per-location targets (FCOS on a ViTDet pyramid) learn from few images in few passes; "
           "DETR's set matching needs far more")
    return fallback, why


def choose_backbone(detector: str, device: str, init_name: str | None) -> tuple[str | None, str]:
    """(backbone name or None for the detector's default, why)."""
    if init_name:
        return init_name, f"the architecture of the model.init weights ({init_name})"
    if device == "cuda":
        return None, f"{detector}'s own backbone (a GPU can afford it)"
    return CPU_BACKBONE, "ViTDet-Tiny: windowed attention and a simple pyramid, small enough to train on a CPU"


def side_for(info: DetectInfo, stride: int, device: str = "cpu") -> int:
    """The training long side: the typical long side (at most MAX_SIDE), no larger than needed for the
    median box to span OBJECT_PX, in multiples of ``stride``, at least MIN_STRIDES strides unless the images
    themselves are smaller."""
    native = max(info.typical_size)
    side = min(native, MAX_SIDE.get(device, MAX_SIDE["cpu"]))
    if info.box_area_frac > 0:
        side = min(side, OBJECT_PX / math.sqrt(info.box_area_frac))
    full = math.ceil(native / stride) * stride  # the images' own size: never upsampled beyond it
    side = math.ceil(side / stride) * stride
    return int(min(full, max(MIN_STRIDES * stride, side)))


def init_architecture(init: str | None) -> str | None:
    """The registered architecture that ``model.init`` weights describe (vitkit's own weights), else None."""
    if not init:
        return None
    from pathlib import Path

    from .rundir import RunDir
    from .weights_io import read_metadata

    p = Path(init).expanduser()
    if p.is_dir() and RunDir(p).is_run():
        p = RunDir(p).weights()
    if p.is_file() and p.suffix == ".safetensors":
        name = read_metadata(p).get("model_name") or None
        return name if name and not Path(name).exists() else None
    return None


def detector_kwargs(cfg) -> dict:
    """``create_detector``'s keyword arguments from the config: ``model.head_args``, and ``model.args`` as the
    backbone's constructor arguments (``backbone_args``)."""
    kwargs = dict(cfg.model.head_args)
    if cfg.model.args:
        kwargs["backbone_args"] = {**dict(kwargs.get("backbone_args") or {}), **dict(cfg.model.args)}
    return kwargs


def choose_detect(cfg, info: DetectInfo, device: str = "cpu", stride: int | None = None) -> DetectChoice:
    """Detector, backbone and image size from the config (the plan wrote its choices there), else defaults:
    the plan's detector rule, the detector's own backbone, the size rule (no timing)."""
    from .detect import detector_entry

    detector = cfg.model.head or choose_detector(info, device)[0]
    entry = detector_entry(detector)  # an unknown name is a ConfigError listing the known ones
    # Without a plan (or when it left model.name unset) the detector's own backbone, or the init weights'.
    backbone = cfg.model.name or init_architecture(cfg.model.init)
    in_chans = 3  # detectors read RGB (the paper's backbones); gray images are expanded
    if cfg.data.img_size:
        side, how = int(cfg.data.img_size), "as configured"
    else:
        side = side_for(info, stride or 16, device)
        how = f"the typical long side in multiples of {stride or 16}"
    h, w = info.typical_size
    why_task = f" ({info.reason})" if info.reason else ""
    reason = (f"task detect{why_task}: {info.n_train:,} training images, typically {h}x{w}, "
              f"{info.boxes_per_image:.1f} boxes per image, so vitkit chose {detector} on "
              f"{backbone or entry.default_backbone}, long side {side} px ({how}; set model.head / model.name / "
              "data.img_size to override)")
    return DetectChoice(detector, backbone, side, in_chans, info.num_classes, reason)


def time_detector(model, side: int, in_chans: int, num_classes: int, batch: int, device, amp_dtype,
                  min_s: float = 1.0, max_steps: int = 4) -> tuple[float, float]:
    """(training img/s, evaluation img/s) of detector ``model`` at ``side`` x ``side``.

    One untimed step, then timed forward + loss + backward + update steps for at least ``min_s`` s
    (2 to ``max_steps``), each image with two random boxes; forward-only for a third of that.
    """
    model = model.to(device).train()
    x = torch.randn(batch, in_chans, side, side, device=device)
    mask = torch.ones(batch, side, side, dtype=torch.bool, device=device)
    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        xy = torch.rand(2, 2, generator=g) * side * 0.5
        wh = torch.rand(2, 2, generator=g) * side * 0.4 + side * 0.1
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(0, num_classes, (2,), generator=g).to(device),
                        "size": torch.tensor([side, side], device=device)})

    return train_eval_rates(model, lambda: model.loss(model(x, mask), targets)["loss"], lambda: model(x, mask),
                            batch, device, amp_dtype, min_s, max_steps)


def time_box_decode(dataset, side: int, in_chans: int, n: int = 16) -> float:
    """Seconds to read, decode and randomly resize, crop and flip one image with its boxes."""
    from .data.boxes_tf import BoxTrainTransform

    return time_transform(dataset, BoxTrainTransform(side, in_chans=in_chans), n)


def calibrate_detect(info: DetectInfo, dataset, cfg, user: dict, device) -> DetectCalibration:
    """Time the planned detector at the planned size, and the box-aware transform (a few seconds)."""
    from .detect import create_detector

    dev = device.type
    detector = str(user.get("model.head") or choose_detector(info, dev)[0])
    init_name = init_architecture(cfg.model.init)
    pretrained = None
    if max(info.typical_size) > PHOTO_SIDE and not (user.get("model.name") or cfg.model.init or init_name):
        pretrained = find_pretrained()
    backbone = user.get("model.name") or (PRETRAINED_MODEL if pretrained else
                                          choose_backbone(detector, dev, init_name)[0])
    in_chans = 3  # detectors read RGB; gray images are expanded
    num_classes = max(1, info.num_classes)
    model = create_detector(detector, backbone, num_classes=num_classes, **detector_kwargs(cfg))
    stride = int(getattr(model, "stride", 16) or 16)
    side = int(user.get("data.img_size") or side_for(info, stride, dev))
    batch = min(CALIB_BATCH, int(user.get("data.batch_size") or planned_dense_batch(info.n_train, dev)))
    amp_dtype = resolve_amp(cfg.engine.amp, device)
    train_rate, eval_rate = time_detector(model, side, in_chans, num_classes, batch, device, amp_dtype)
    return DetectCalibration(dev, {detector: train_rate}, time_box_decode(dataset, side, in_chans),
                             eval_img_per_s={detector: eval_rate}, stride=stride, img_size=side,
                             params=sum(p.numel() for p in model.parameters()), pretrained=pretrained)


def make_detect_plan(info: DetectInfo, calib: DetectCalibration, user: dict[str, object],
                     init_name: str | None = None) -> Plan:
    """The plan for detection data ``info`` on the calibrated machine; ``user``: the keys the user set.

    ``calib.img_per_s`` holds the timed detector's rate under its name. Pure: tests check it on
    made-up statistics and timings.
    """
    plan = Plan()
    n = max(1, info.n_train)
    h, w = info.typical_size
    device = calib.device
    detector, why_detector = choose_detector(info, device)
    if "model.head" in user:
        detector = str(user["model.head"])
    else:
        plan.set("model.head", detector, why_detector)
    backbone, why_backbone = choose_backbone(detector, device, init_name)
    pretrained = calib.pretrained if not (init_name or "model.init" in user or "model.name" in user) else None
    if pretrained:
        backbone, why_backbone = PRETRAINED_MODEL, f"{h}x{w} photos: a backbone with ImageNet weights ({pretrained})"
        plan.set("model.init", pretrained, "ImageNet weights (cached or reachable): few images train far better "
                                           "from them")
    if "model.name" not in user and backbone is not None:
        plan.set("model.name", backbone, why_backbone)
    finetune = init_name is not None or "model.init" in user or bool(pretrained)
    set_family = detector in SET_DETECTORS or detector.startswith(("detr", "deformable", "yolos"))

    if "engine.time_budget" in user:
        budget_s = parse_duration(user["engine.time_budget"])
    elif "engine.epochs" in user or device == "cuda":
        budget_s = None
    else:
        budget_s = dense_budget_s(n)
        plan.set("engine.time_budget", f"{budget_s / 60:g}m",
                 f"CPU detection run: 20 min for up to 1,000 images ({n:,} here), at most 1 h")
    rate = calib.img_per_s.get(detector) or next(iter(calib.img_per_s.values()), 1.0)
    rate = 1.0 / (1.0 / max(rate, 1e-6) + calib.decode_s)  # decoding shares the cores: counted in series
    if budget_s is None:
        epochs = float(user.get("engine.epochs") or min(300, max(30 if finetune else 50, round(3e5 / n))))
    else:
        epochs = rate * 0.9 * budget_s / n  # ~10% for startup, calibration and evaluations
    plan.img_per_s, plan.eval_img_per_s = rate, calib.eval_img_per_s.get(detector)

    side = int(user.get("data.img_size") or calib.img_size or side_for(info, calib.stride, device))
    if "data.img_size" not in user:
        frac = f", median box {info.box_area_frac:.1%} of the image" if info.box_area_frac else ""
        plan.set("data.img_size", side, f"{h}x{w} images{frac}: long side in multiples of the stride {calib.stride}, "
                                        f"at most {MAX_SIDE.get(device, MAX_SIDE['cpu'])} and no more than the median "
                                        f"box needs to span {OBJECT_PX} px")
    batch = int(user.get("data.batch_size") or planned_dense_batch(n, device))
    if "data.batch_size" not in user:
        plan.set("data.batch_size", batch, f"{n:,} training images: >= 30 steps per epoch, at most "
                                           f"{planned_dense_batch(10**9, device)}")
    base = DET_LR_16["finetune" if finetune else "scratch"]
    eff = base * math.sqrt(batch / 16)
    plan.set("optim.lr", float(f"{eff * 512 / batch:.3g}"),
             f"AdamW {eff:.2g} at batch {batch} ({'fine-tuning' if finetune else 'from scratch'}, square-root scaled "
             f"from {base:g} at 16; per 512 in the config)")
    plan.set("optim.weight_decay", 1e-4 if set_family else 0.05,
             "DETR's 1e-4" if set_family else "ViTDet's AdamW weight decay 0.05 (0.1 in the paper at 100 epochs)")
    plan.set("optim.clip_grad", SET_CLIP if set_family else ONE_STAGE_CLIP,
             "DETR clips gradients at norm 0.1" if set_family else "box regression spikes early: clip at norm 1")
    plan.set("schedule.name", "cosine", "warmup, then cosine to the end of the run")
    plan.set("schedule.warmup_epochs", round(min(5.0, max(0.3, 0.03 * epochs)), 2), f"3% of ~{epochs:.0f} epochs (0.3-5)")
    plan.set("data.hflip", 0.5, "random resize, crop (boxes clipped, tiny ones dropped) and flip, on image and boxes")
    plan.set("data.scale_min", DET_SCALE_MIN, "random crops keep at least half the image side: whole objects survive")
    plan.set("data.color_jitter", 0.2, "photometric jitter on the image only (boxes stay exact)")
    plan.set("engine.ema_decay", None, "the annealed cosine weights need no average")
    set_run_length(plan, epochs, n, budget_s, user)
    if info.boxes_per_image:
        plan.notes.append(f"{info.num_classes} classes ({', '.join(info.classes[:10])}"
                          f"{' ...' if len(info.classes) > 10 else ''}), {info.boxes_per_image:.1f} boxes per image, "
                          f"median box {info.box_area_frac:.1%} of the image area")
    for k in [k for k in plan.values if k in user]:
        del plan.values[k], plan.reasons[k]
    return plan


def plan_detect_run(cfg, info: DetectInfo, dataset, user_keys, device, verbose: bool = True) -> Plan:
    """Calibrate, plan and apply the plan to ``cfg``; prints the plan. Returns it."""
    user = user_values(cfg, user_keys)
    init_name = init_architecture(cfg.model.init)
    with torch.random.fork_rng(devices=[]):  # timing must not shift the run's model init
        calib = calibrate_detect(info, dataset, cfg, user, device)
    plan = make_detect_plan(info, calib, user, init_name)
    apply_plan(cfg, plan)
    reason = info.reason or info.format
    plan.notes[:0] = [f"task detect ({reason}): {info.n_train:,} training and {info.n_val:,} validation images, "
                      f"typically {info.typical_size[0]}x{info.typical_size[1]}",
                      *(n for n in info.notes if n not in reason)]
    plan.notes.append(f"calibration on {calib.device} at {calib.img_size} px: "
                      + ", ".join(f"{k} {v:.1f} img/s" for k, v in calib.img_per_s.items())
                      + f" ({calib.params / 1e6:.1f}M params); decode+crop {calib.decode_s * 1e3:.1f} ms/image")
    if verbose:
        print("\n".join(plan.lines()), flush=True)
    return plan


__all__ = ["DetectCalibration", "DetectChoice", "DetectInfo", "choose_detect", "detect_info", "make_detect_plan",
           "plan_detect_run", "side_for"]
