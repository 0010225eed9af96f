"""The data-aware plan for dense data: what ``vitkit train --data camvid/`` trains with no flags.

The classification plan (:mod:`vitkit.plan`) picks a model, a resolution and a length from a
scan of the images and a short timing on this machine; this is its counterpart for
segmentation and depth, stated in the same ``key=value  # reason`` lines. Every rule reads only
the scan (image size and count, classes, the pixel frequency of each class) and the measured
speed, so no dataset is special-cased:

- **Length.** On a CPU the run gets a wall-clock budget: 20 minutes for up to
  ``DENSE_BUDGET_IMAGES`` training images (a dense model learns from every pixel but needs many
  passes to settle its boundaries, twice the classification plan's 10 minutes), proportionally
  more beyond, at most an hour. On a GPU the length is in epochs.
- **Backbone.** ``BACKBONE``: a conv-stem nano ViT with 8 px patches. It trains from scratch on
  a CPU in minutes (the conv stem gives it the locality a plain patch embedding lacks), and its
  stride-8 tokens keep thin classes (poles, signs) several tokens wide where 16 px patches would
  blur them into their neighbours.
- **Crop.** The training crop is the largest multiple of the model's stride that fits the
  shorter side of the typical image (at most ``MAX_CROP`` px, at least 2 strides): random
  scaling (0.5-2x) and flipping already vary the content, so a crop close to the full image
  keeps the whole scene's context. Evaluation runs at full resolution (padded to the stride);
  images more than twice the crop are evaluated in sliding windows of the crop.
- **Head.** Each candidate head (``HEAD_CANDIDATES``, those registered for the task) is timed
  for a few training steps at the crop, and its native output stride is measured (the size of
  the map it returns before upsampling). The plan takes the finest-output head that still gets
  ``MIN_DENSE_EPOCHS`` passes in the budget (ties: the faster one; finer than stride 1 counts as
  stride 1), its decoder as wide as the backbone's features allow (a power of two within
  them, not the papers' 256-512 channels meant for 768-wide backbones): the mIoU of small classes
  is bounded by how finely the logits resolve them, and below ``MIN_DENSE_EPOCHS`` passes a
  from-scratch model has not converged whatever its head.
- **Classes.** The pixel frequency of each class is counted on a sample of the training masks;
  when the rarest present class has fewer than 1/``IMBALANCE_RATIO`` of the commonest's pixels,
  the loss weighs classes by the inverse square root of their frequency (mIoU counts every
  class the same).
"""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from .engine.budget import parse_duration
from .engine.runtime import autocast, resolve_amp
from .plan import Calibration, Plan, apply_plan, aug_strength, user_values
from .plan_eval import set_run_length

BACKBONE = "vit_nano_convstem_patch8_64"
# Most capable first; those the registry does not serve for the task are skipped.
HEAD_CANDIDATES = {"segment": ("upernet", "setr_pup", "linear"), "depth": ("dpt", "upernet", "linear")}
DEFAULT_HEAD = {"segment": "upernet", "depth": "dpt"}  # without a plan: the finest of the candidates
MIN_DENSE_EPOCHS = 40
# The constructor argument that sets each head's decoder width (planned from the backbone's width).
HEAD_WIDTH_ARG = {"upernet": "channels", "setr_pup": "channels", "setr_naive": "channels", "dpt": "features",
                  "vit_adapter": "decoder_channels"}
MIN_HEAD_WIDTH = 32
CALIB_BATCH, SLOW_STEP = 4, 3.0  # timing batch; a first step over SLOW_STEP x the timing window ends the timing
DENSE_BUDGET_S, DENSE_BUDGET_IMAGES, DENSE_BUDGET_MAX_S = 1200.0, 1000, 3600.0
MAX_CROP = {"cpu": 256, "cuda": 512}
IMBALANCE_RATIO = 10.0
RARE_FRACTION = 0.005  # classes below this share of the labelled pixels get a note
# AdamW lr at a batch of 16 from scratch, square-root scaled to the planned batch (as vitkit.plan).
DENSE_LR_16 = 1e-3


@dataclass
class DenseInfo:
    """What the plan reads of the data: typical (H, W), counts, channels, classes and the ignore value."""

    task: str
    typical_size: tuple[int, int]
    n_train: int
    n_val: int
    in_chans: int
    num_classes: int
    classes: tuple[str, ...] = ()
    ignore_index: int | None = None
    format: str = ""
    class_pixels: tuple[int, ...] = ()  # labelled pixels per class in the sampled training masks
    notes: tuple[str, ...] = ()  # what the reader found (void values, where the classes came from)
    reason: str = ""  # why the data is this task (the task rule's sentence)


@dataclass
class DenseChoice:
    """The backbone, head and square training crop of a dense run, with the sentence that says why."""

    backbone: str
    head: str
    crop: int
    in_chans: int
    num_classes: int
    reason: str


@dataclass
class HeadTiming:
    """Measured for one head on the planned backbone: training and evaluation img/s, native output stride."""

    train_img_s: float
    eval_img_s: float
    out_stride: float
    params: int = 0
    extra: dict = field(default_factory=dict)


def dense_info(data, task: str) -> DenseInfo:
    """The plan's view of a dense :class:`~vitkit.data.stage.DataStage` (its ``info`` came from
    :func:`~vitkit.data.inspect.describe_dense`: sizes, channels, pixels per class)."""
    info, train = data.info, data.train
    segment = task == "segment"
    return DenseInfo(
        task=task, typical_size=(int(info.typical_size[0]), int(info.typical_size[1])), n_train=info.n_train,
        n_val=info.n_val, in_chans=int(info.in_chans), num_classes=int(train.num_classes) if segment else 0,
        classes=tuple(str(c) for c in (train.classes or ())) if segment else (),
        ignore_index=int(train.ignore_index) if segment else None, format=str(info.format),
        class_pixels=tuple(int(c) for c in info.class_counts) if segment else (),
        notes=tuple(getattr(info, "notes", ()) or ()), reason=str(getattr(data, "reason", "") or ""),
    )


def crop_for(typical_size: tuple[int, int], stride: int, device: str = "cpu") -> int:
    """The largest multiple of ``stride`` within the shorter side (at most MAX_CROP, at least 2 strides)."""
    top = MAX_CROP.get(device, MAX_CROP["cpu"])
    side = min(min(typical_size), top)
    return int(max(2 * stride, side // stride * stride))


def head_width_args(head: str, width: int) -> dict:
    """The planned width of a head's decoder: the largest power of two within the backbone's feature width.

    The papers' 256-512 channels decode 768-1024-wide backbones; on a nano backbone such a decoder
    holds nearly all the parameters and the time, and cannot receive more than the backbone gives.
    """
    arg = HEAD_WIDTH_ARG.get(head)
    if arg is None:
        return {}
    return {arg: int(max(MIN_HEAD_WIDTH, 2 ** int(math.log2(max(1, width)))))}


def dense_budget_s(n_train: int) -> float:
    """The CPU budget: 20 min up to DENSE_BUDGET_IMAGES training images, proportionally more beyond, at most 1 h."""
    s = DENSE_BUDGET_S * max(1.0, n_train / DENSE_BUDGET_IMAGES)
    return min(DENSE_BUDGET_MAX_S, 60.0 * math.ceil(s / 60.0))


def planned_dense_batch(n_train: int, device: str) -> int:
    """8 on a CPU (16 on a GPU), smaller for small datasets so an epoch has >= 30 steps, at least 2."""
    top = 16 if device == "cuda" else 8
    fit = 2 ** int(math.log2(max(1, n_train // 30)))
    return int(max(2, min(top, fit)))


def default_head(task: str) -> str:
    """The head without a plan: the finest-output candidate the registry serves for ``task``."""
    from .dense.registry import list_heads

    served = list_heads(task)
    return next((h for h in HEAD_CANDIDATES[task] if h in served), served[0] if served else DEFAULT_HEAD[task])


def probe_model(backbone: str, head: str, task: str, in_chans: int, num_classes: int, backbone_args=None,
                head_args=None) -> tuple[int, int]:
    """(input multiple the model needs, the backbone's feature width), asked of a small copy of the model."""
    from .dense import create_dense_model

    with torch.random.fork_rng(devices=[]):
        model = create_dense_model(backbone, head, num_classes=num_classes or None, task=task, img_size=64,
                                   in_chans=in_chans, backbone_args=dict(backbone_args or {}),
                                   head_args=dict(head_args or {}))
    return int(model.stride), int(model.backbone.num_features)


def choose_dense(cfg, info: DenseInfo, device: str = "cpu") -> DenseChoice:
    """Backbone, head and crop from the config, else the plan's defaults for this data (no timing)."""
    task = info.task
    in_chans = cfg.data.in_chans or info.in_chans
    num_classes = info.num_classes if task == "segment" else 0
    backbone = cfg.model.name or BACKBONE
    head = cfg.model.head or default_head(task)
    if cfg.data.img_size:
        crop, how = int(cfg.data.img_size), "as configured"
    else:
        stride = probe_model(backbone, head, task, in_chans, num_classes, cfg.model.args, cfg.model.head_args)[0]
        crop, how = crop_for(info.typical_size, stride, device), f"the shorter side in multiples of {stride}"
    h, w = info.typical_size
    what = f"{num_classes} classes" if task == "segment" else "depth"
    why_task = f" ({info.reason})" if info.reason else ""
    reason = (f"task {task}{why_task}: images are typically {h}x{w} ({what}), so vitkit chose {backbone} with the {head} head, "
              f"trained on {crop}x{crop} crops ({how}; set model.name / model.head / data.img_size to override)")
    return DenseChoice(backbone, head, crop, in_chans, num_classes, reason)


def time_dense(backbone: str, head: str, crop: int, task: str, in_chans: int, num_classes: int, batch: int,
               device, amp_dtype, backbone_args=None, head_args=None, min_s: float = 1.0,
               max_steps: int = 6) -> HeadTiming:
    """Training and evaluation img/s of ``backbone`` + ``head`` at ``crop`` px, and the head's native output stride.

    Two untimed steps, then timed forward+backward+update steps for at least ``min_s`` seconds
    (2 to ``max_steps``); forward-only at the same batch for a third of that. A first step slower
    than ``SLOW_STEP * min_s`` ends the timing there (its rate, an underestimate, rules the head out).
    """
    from .dense import create_dense_model

    model = create_dense_model(backbone, head, num_classes=num_classes or None, task=task, img_size=crop,
                               in_chans=in_chans, backbone_args=dict(backbone_args or {}),
                               head_args=dict(head_args or {})).to(device).train()
    x = torch.randn(batch, in_chans, crop, crop, device=device)
    if task == "segment":
        y = torch.randint(0, max(1, num_classes), (batch, crop, crop), device=device)
        loss_fn = F.cross_entropy
    else:
        y = torch.rand(batch, 1, crop, crop, device=device)
        loss_fn = F.l1_loss
    step = update_step(model, lambda: loss_fn(model(x).float(), y), device, amp_dtype)
    t0 = time.perf_counter()
    step()  # the first steps pay for kernel selection and allocation
    first_s = time.perf_counter() - t0
    if first_s > SLOW_STEP * min_s:
        # Far too slow to matter: one step (an overestimate of the steady cost) says so; more would waste the budget.
        train_rate = eval_rate = batch / first_s
    else:
        step()
        train_rate = timed_rate(step, batch, min_s, max_steps, device)
    model.eval()
    with torch.no_grad(), autocast(amp_dtype, device):
        native = model.head(model.backbone, x[:1]).shape[-2]  # before DenseModel upsamples to the input
        if first_s <= SLOW_STEP * min_s:
            eval_rate = timed_rate(lambda: model(x), batch, min_s / 3, max_steps, device)
    params = sum(p.numel() for p in model.parameters())
    return HeadTiming(train_rate, eval_rate, crop / max(1, native), params, {"head_args": dict(head_args or {})})


def time_joint_decode(dataset, crop: int, in_chans: int, ignore_index: int, n: int = 16) -> float:
    """Seconds to read, decode and randomly scale, crop and flip one image with its target."""
    from .data.joint import JointTrainTransform

    return time_transform(dataset, JointTrainTransform(crop, in_chans, ignore_index=ignore_index), n)


def time_transform(dataset, tf, n: int = 16) -> float:
    """Seconds to read and decode one image of ``dataset`` (``load(i) -> (img, target, bad)``) and pass it
    with its target through ``tf(img, target, rng)``, over ``n`` random images."""
    if len(dataset) == 0:
        return 0.0
    idx = np.random.default_rng(0).permutation(len(dataset))[:n]
    rng = random.Random(0)
    t0 = time.perf_counter()
    for i in idx:
        img, target, _ = dataset.load(int(i))
        tf(img, target, rng)
    return (time.perf_counter() - t0) / len(idx)


def update_step(model, loss_fn, device, amp_dtype, lr: float = 1e-4):
    """A training step to time: ``loss_fn()`` under autocast, backward, an AdamW update (waiting for the device)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step():
        with autocast(amp_dtype, device):
            loss = loss_fn()
        loss.float().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def train_eval_rates(model, loss_fn, eval_fn, batch: int, device, amp_dtype, min_s: float,
                     max_steps: int) -> tuple[float, float]:
    """(training, evaluation) items/s of ``model``: one untimed :func:`update_step` of ``loss_fn``, then timed
    steps for at least ``min_s`` s (2 to ``max_steps``); ``eval_fn()`` without gradients for a third of that."""
    step = update_step(model, loss_fn, device, amp_dtype)
    step()  # the first step pays for kernel selection and allocation
    train_rate = timed_rate(step, batch, min_s, max_steps, device)
    model.eval()
    with torch.no_grad(), autocast(amp_dtype, device):
        eval_rate = timed_rate(eval_fn, batch, min_s / 3, max_steps, device)
    return train_rate, eval_rate


def timed_rate(fn, batch: int, seconds: float, max_steps: int, device) -> float:
    """Images per second of ``fn`` (one batch of ``batch`` per call), called 2 to ``max_steps`` times for at
    least ``seconds``."""
    t0, n = time.perf_counter(), 0
    while n < 2 or (n < max_steps and time.perf_counter() - t0 < seconds):
        fn()
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * n / (time.perf_counter() - t0)


@dataclass
class DenseCalibration(Calibration):
    """A :class:`~vitkit.plan.Calibration` with the per-head measurements (keys: head names)."""

    heads: dict[str, HeadTiming] = field(default_factory=dict)
    stride: int = 8
    crop: int = 0


def _rate(calib: DenseCalibration, head: str) -> float:
    # Decoding runs in loader workers on the same cores: counted in series, to be safe.
    return 1.0 / (1.0 / max(calib.heads[head].train_img_s, 1e-6) + calib.decode_s)


def calibrate_dense(info: DenseInfo, dataset, cfg, user: dict, device) -> DenseCalibration:
    """Time the candidate heads on the backbone at the planned crop, and the joint transform (a few seconds)."""
    from .dense.registry import list_heads

    task = info.task
    backbone = str(user.get("model.name") or BACKBONE)
    args = dict(cfg.model.args)
    in_chans = cfg.data.in_chans or info.in_chans
    served = list_heads(task)
    heads = [str(user["model.head"])] if "model.head" in user else [h for h in HEAD_CANDIDATES[task] if h in served]
    if not heads:
        heads = served[:1]
    width = probe_model(backbone, "linear", task, in_chans, info.num_classes, args)[1]
    head_args = {h: dict(user["model.head_args"]) if "model.head_args" in user else head_width_args(h, width)
                 for h in heads}
    # Every candidate must tile the crop: the common multiple of their strides.
    stride = math.lcm(*(probe_model(backbone, h, task, in_chans, info.num_classes, args, head_args[h])[0]
                        for h in heads))
    crop = int(user.get("data.img_size") or crop_for(info.typical_size, stride, device.type))
    # Per-image cost barely depends on the batch here; a small one keeps the timing short.
    batch = min(CALIB_BATCH, int(user.get("data.batch_size") or planned_dense_batch(info.n_train, device.type)))
    amp_dtype = resolve_amp(cfg.engine.amp, device)
    ignore = info.ignore_index if info.ignore_index is not None else 255
    calib = DenseCalibration(device.type, {}, time_joint_decode(dataset, crop, in_chans, ignore), stride=stride,
                             crop=crop)
    for h in heads:
        calib.heads[h] = time_dense(backbone, h, crop, task, in_chans, info.num_classes, batch, device, amp_dtype,
                                    args, head_args[h])
        calib.img_per_s[h] = calib.heads[h].train_img_s
        calib.eval_img_per_s[h] = calib.heads[h].eval_img_s
    return calib


def _pick_head(calib: DenseCalibration, epochs_of) -> tuple[str, str]:
    """The finest-output head with at least MIN_DENSE_EPOCHS passes (ties: faster); else the fastest."""
    timings = calib.heads
    fits = [h for h in timings if epochs_of(h) >= MIN_DENSE_EPOCHS]
    pool = fits or list(timings)
    if fits:  # output finer than the input pixels resolves nothing more: stride 1 at best
        best = min(pool, key=lambda h: (max(1.0, timings[h].out_stride), -_rate(calib, h)))
    else:
        best = max(pool, key=lambda h: _rate(calib, h))

    def stride(h):
        s = timings[h].out_stride
        return f"output stride {s:g}" if s > 1 else "full-resolution output"

    measured = "; ".join(f"{h}: {stride(h)}, {_rate(calib, h):.1f} img/s, ~{epochs_of(h):.0f} epochs" for h in timings)
    if len(timings) == 1:
        why = f"{best} ({measured})"
    elif fits:
        why = (f"the finest output among heads that get >= {MIN_DENSE_EPOCHS} epochs ({measured}): "
               "small classes need fine logits")
    else:
        why = f"no head gets {MIN_DENSE_EPOCHS} epochs in the budget, so the fastest ({measured})"
    return best, why


def make_dense_plan(info: DenseInfo, calib: DenseCalibration, user: dict[str, object],
                    objective_keys: dict[str, object] | None = None) -> Plan:
    """The plan for dense data ``info`` on the calibrated machine; ``user``: the keys the user set.

    ``objective_keys`` are the keys of the task's objective (``objective.<key>`` planned only
    when the objective has it). Pure: tests check it on made-up scans and timings.
    """
    plan = Plan()
    task, n = info.task, max(1, info.n_train)
    h, w = info.typical_size
    objective_keys = objective_keys or {}

    if "engine.time_budget" in user:
        budget_s = parse_duration(user["engine.time_budget"])
    elif "engine.epochs" in user or calib.device == "cuda":
        budget_s = None
    else:
        budget_s = dense_budget_s(n)
        plan.set("engine.time_budget", f"{budget_s / 60:g}m",
                 f"CPU dense run: 20 min for up to {DENSE_BUDGET_IMAGES:,} images ({n:,} here), at most 1 h")

    def epochs_of(head: str) -> float:
        if budget_s is None:
            return float(user.get("engine.epochs") or min(300, max(50, round(2e5 / n))))
        return _rate(calib, head) * 0.9 * budget_s / n  # ~10% for startup, calibration and the final eval

    if "model.name" not in user:
        plan.set("model.name", BACKBONE, "conv-stem nano ViT, 8 px patches: trains from scratch on a CPU, "
                                         "and thin classes stay several tokens wide")
    head, why = _pick_head(calib, epochs_of)
    if "model.head" not in user:
        plan.set("model.head", head, why)
    head_args = calib.heads[head].extra.get("head_args") or {}
    if head_args and "model.head_args" not in user:
        plan.set("model.head_args", head_args, "decoder width: a power of two within the backbone's features (the "
                                               "papers' 256-512 channels decode 768-1024-wide backbones)")
    if "data.img_size" not in user:
        plan.set("data.img_size", calib.crop, f"{h}x{w} images: the shorter side in multiples of the stride "
                                              f"{calib.stride} (at most {MAX_CROP.get(calib.device, 256)}); "
                                              "evaluated at full resolution")
    epochs = epochs_of(head)
    plan.img_per_s = _rate(calib, head)
    plan.eval_img_per_s = calib.eval_img_per_s.get(head)
    batch = int(user.get("data.batch_size") or planned_dense_batch(n, calib.device))
    if "data.batch_size" not in user:
        plan.set("data.batch_size", batch, f"{n:,} training images: >= 30 steps per epoch, at most "
                                           f"{planned_dense_batch(10**9, calib.device)}")
    eff = DENSE_LR_16 * math.sqrt(batch / 16)
    plan.set("optim.lr", float(f"{eff * 512 / batch:.3g}"),
             f"AdamW {eff:.2g} at batch {batch} (from scratch, square-root scaled from {DENSE_LR_16:g} at 16; "
             "per 512 in the config)")
    plan.set("optim.clip_grad", 1.0, "per-pixel losses spike on rare classes early: clip gradients at norm 1")
    plan.set("schedule.name", "onecycle", "from scratch: one cycle, annealed at the end of the run")
    plan.set("schedule.warmup_epochs", round(min(5.0, max(0.3, 0.03 * epochs)), 2), f"3% of ~{epochs:.0f} epochs (0.3-5)")
    s = aug_strength(epochs)
    plan.set("data.hflip", 0.5, "random scale (0.5-2x), crop and flip, applied to image and target alike")
    plan.set("data.color_jitter", 0.2 if task == "segment" else 0.0,
             "photometric jitter on the image only (masks stay exact)" if task == "segment"
             else "depth: no photometric change, shading is a depth cue")
    plan.set("model.drop_path_rate", round(0.1 * s, 2), f"~{epochs:.0f} epochs: drop path grows with the passes")
    plan.set("engine.ema_decay", None, "the annealed one-cycle weights need no average")
    set_run_length(plan, epochs, n, budget_s, user)

    crop = int(user.get("data.img_size") or calib.crop)
    if "window" in objective_keys and "objective.window" not in user and max(h, w) > 2 * crop:
        plan.set("objective.window", crop, f"{h}x{w} images, more than twice the crop: sliding-window evaluation")
    if task == "segment":
        _class_plan(info, plan, objective_keys, user)
    for k in [k for k in plan.values if k in user]:
        del plan.values[k], plan.reasons[k]
    return plan


def _class_plan(info: DenseInfo, plan: Plan, objective_keys: dict, user: dict) -> None:
    names = list(info.classes) or [str(i) for i in range(info.num_classes)]
    pixels = np.asarray(info.class_pixels or [0] * info.num_classes, dtype=np.float64)
    ignore = f"ignore index {info.ignore_index}" if info.ignore_index is not None else "no ignore index"
    total = pixels.sum()
    if total <= 0:
        plan.notes.append(f"{info.num_classes} classes ({', '.join(names)}), {ignore}")
        return
    frac = pixels / total
    shares = ", ".join(f"{c} {f:.1%}" for c, f in zip(names, frac))
    plan.notes.append(f"{info.num_classes} classes, {ignore}; share of labelled pixels: {shares}")
    present = frac[frac > 0]
    ratio = float(present.max() / present.min()) if len(present) else 1.0
    if "class_weights" in objective_keys and "objective.class_weights" not in user:
        if ratio > IMBALANCE_RATIO:
            plan.set("objective.class_weights", "inverse_sqrt",
                     f"pixel shares differ {ratio:.0f}:1 (> {IMBALANCE_RATIO:g}:1): mIoU counts every class the same")
        else:
            plan.set("objective.class_weights", "none", f"pixel shares within {ratio:.1f}:1: unweighted")
    rare = [c for c, f in zip(names, frac) if 0 < f < RARE_FRACTION]
    absent = [c for c, f in zip(names, frac) if f == 0]
    if rare:
        plan.notes.append(f"classes under {RARE_FRACTION:.1%} of the pixels: {rare}; their IoU will be noisy")
    if absent:
        plan.notes.append(f"classes absent from the sampled training masks: {absent}")


def plan_dense_run(cfg, info: DenseInfo, dataset, user_keys, device, objective_keys: dict | None = None,
                   verbose: bool = True) -> Plan:
    """Calibrate, plan and apply the plan to ``cfg``; prints the plan. Returns it."""
    user = user_values(cfg, user_keys)  # objective.* keys included: the section is a dict
    with torch.random.fork_rng(devices=[]):  # timing must not shift the run's model init
        calib = calibrate_dense(info, dataset, cfg, user, device)
    plan = make_dense_plan(info, calib, user, objective_keys)
    apply_plan(cfg, plan)
    plan.notes[:0] = [f"task {info.task} ({info.reason or info.format}): {info.n_train:,} training and "
                      f"{info.n_val:,} validation images, typically {info.typical_size[0]}x{info.typical_size[1]}",
                      *info.notes]
    rates = ", ".join(f"{h} {t.train_img_s:.1f} img/s ({t.params / 1e6:.1f}M params)" for h, t in calib.heads.items())
    plan.notes.append(f"calibration on {calib.device} at {calib.crop} px: {rates}; "
                      f"decode+crop {calib.decode_s * 1e3:.1f} ms/image")
    if verbose:
        print("\n".join(plan.lines()), flush=True)
    for n in plan.notes:
        if "noisy" in n:
            warnings.warn(n, stacklevel=2)
    return plan
