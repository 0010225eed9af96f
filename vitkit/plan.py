"""The data-aware plan: what ``vitkit train --data DIR`` trains when no recipe is named.

From the dataset scan (:class:`~vitkit.data.inspect.DatasetInfo`) and a short timed calibration
on this machine (:func:`calibrate`, with the timers of :mod:`vitkit.plan_calibrate`: a few
training steps of each candidate model, and the cost of decoding and cropping real images),
:func:`make_plan` chooses the model, resolution, batch, lr, schedule, augmentation,
regularisation, class balance, early stop and length, each with a one-line reason.
:func:`make_plan` is a pure function of those numbers, so tests can check it on synthetic scans.

Rules, all derived from the scan and the measured speed (no dataset is special-cased):

- **Length.** On a CPU the run gets a wall-clock budget: 10 minutes for up to 50,000 images,
  growing in proportion to the image count beyond that, at most an hour. On a GPU it is sized in
  epochs (more passes for fewer images). ``epochs_expected = img/s x training time / n_train``.
- **Size** (:func:`image_class`, the one rule; runs without the plan use it through
  :func:`default_model`): up to ``SMALL_SIDE`` px small images, beyond that photos.
- **Model.** Small images train from scratch at 32 px on conv-stem nano ViTs; of the two
  candidates the one with more tokens is taken when the budget still affords it ``MIN_EPOCHS``
  passes, else the faster one. Photos of any size fine-tune a pretrained DeiT-Tiny when its
  weights are cached or the hub answers and they load, at the resolution the budget affords
  (:mod:`vitkit.plan_peft`); otherwise (the reason is given) they train from scratch at 64 px.
- **Fine-tuning** from pretrained weights (the plan's, or the user's ``model.init``, whose recorded
  architecture is built): batches of at most 32 (64 on a GPU), a lower lr, layer-wise lr decay,
  clipping, cosine; on at most 2,000 images LoRA on ``qkv`` instead of every weight.
- **Augmentation and regularisation** grow with the expected epochs: flips of whole images for a
  run from scratch too short to fit its data (up to ``FEW_EPOCHS`` passes), light (crop + flip) for a
  short run (up to ``LIGHT_EPOCHS`` passes), then RandAugment, label smoothing, erasing,
  mixup/cutmix, drop path and an EMA of the weights, up to DeiT strength at ``STRONG_EPOCHS``.
- **Speed and evaluation**: channels-last memory for the conv-stem models trained from scratch;
  flip averaging at evaluation (``objective.tta=hflip``) when training flips the images.
- **Classes** more imbalanced than ``BALANCE_RATIO`` are balanced (``data.balance``).
- **Early stop** (``engine.plateau_patience``) when the plan sets the run's length, the
  validation set has ``PLATEAU_MIN_VAL`` images or more, and watching it costs at most
  ``PLATEAU_COST`` of the run (:mod:`vitkit.plan_eval`).
"""

from __future__ import annotations

import math
import warnings

import torch

from .data.inspect import DatasetInfo
from .engine.budget import parse_duration
from .engine.runtime import resolve_amp
from .models import get_model_card
from .plan_calibrate import (
    PRETRAINED_MODEL,
    Calibration,
    Candidate,
    Plan,
    apply_plan,
    first_stride,
    init_candidate,
    time_decode,
    time_model,
    usable_pretrained,
    user_values,
)
from .plan_data import plan_data_path
from .plan_eval import _ep, plan_plateau, plan_speed_and_eval, set_run_length
from .plan_peft import (
    FINETUNE_MIN_EPOCHS,
    PEFT_LR_128,
    finetune_reason,
    plan_peft,
    pretrained_candidates,
    set_finetune_recipe,
)

SMALL_SIDE, MEDIUM_SIDE = 48, 128
# Passes the larger candidate must still get to be chosen. benchmarks/plan_sweep.py ("min_epochs"): under
# the same budgets (1-9 min) the 64-token small-image candidate scored below the 16-token one by more than
# the noise at every budget on both rows, up to 65 passes (cat/dog, 1,000 images: 68.5% vs 74.0% at 9 min;
# the earlier 15 had picked it there). 100 is a bound above every measured loss, not a measured crossover.
MIN_EPOCHS = 100
# Augmentation strength 0 at or below LIGHT_EPOCHS passes, 1 (DeiT's) at DeiT's own 300 epochs.
# Measured on an 8,000-image 28 px grayscale folder in a 10-minute CPU budget (~35 epochs): crops
# and flips alone reached 87.9% test accuracy where 64% of DeiT strength (the curve's value there
# when it ran from 5 to 100 epochs) reached 82.6%; a short run underfits, and regularising it costs.
LIGHT_EPOCHS, STRONG_EPOCHS = 30.0, 300.0
# Crops from scratch: at or below FEW_EPOCHS passes a run underfits (its training accuracy under
# augmentation stays below its validation accuracy) and random-resized crops only slow it, so it sees
# whole images, flipped; from there to LIGHT_EPOCHS the crop's smallest area falls log-linearly from 1
# to 0.5. Measured (benchmarks/results/defaults.json, "few_epochs_crops"): the 60,000-image Fashion-MNIST
# row's no-flag run in its 12 minutes, 90.6% on whole images (3.8 passes) against 87.6% with crops of at
# least half the image (4.4 passes; SE of the difference 0.4); CIFAR-10 in its 10 minutes, 72.4% (3.8 passes)
# against 69.3% (4.5 passes; SE 0.6). The 10-pass knee is not swept.
FEW_EPOCHS = 10.0
CPU_BUDGET_S, CPU_BUDGET_IMAGES, CPU_BUDGET_MAX_S = 600.0, 50_000, 3600.0
MIN_CLASS_IMAGES = 10
# AdamW lr at a batch of 128 (from the tuned small-image recipe, 6e-3 per 512; fine-tuning 1e-3
# per 512), square-root scaled to the planned batch: linear scaling starves small batches.
SCRATCH_LR_128, FINETUNE_LR_128 = 1.5e-3, 2.5e-4
# Above 3:1 the smallest class weighs under a third of the largest in the loss. The sampler (each class
# drawn equally often) measured best on the 10:1 long-tailed Fashion-MNIST row (benchmarks/plan_sweep.py,
# "balance": balanced accuracy 85.7% sampler, 84.8% inverse-frequency loss weights, 83.2% neither, SE ~0.6
# each, the no-flag plan at 10 min), as for CNNs in nearly every setting of Buda et al. 2018 (Neural
# Networks 106). The 3:1 threshold itself is not swept.
BALANCE_RATIO, BALANCE = 3.0, "sampler"
# From scratch, most capable first: conv-stem nano ViTs train in minutes on a CPU.
SCRATCH = {
    "small": (Candidate("vit_nano_convstem_patch4_32", 32),
              Candidate("vit_nano_convstem_patch8_64", 32, (("stem_width", 192),))),
    "medium": (Candidate("vit_nano_convstem_patch8_64", 64), Candidate("vit_nano_convstem_patch16_64", 64)),
}


def image_class(side: int) -> str:
    """The one size rule, on the longer side: ``"small"`` up to ``SMALL_SIDE`` px (digits, thumbnails),
    ``"medium"`` up to ``MEDIUM_SIDE``, else ``"large"``; medium and large images are photos."""
    return "small" if side <= SMALL_SIDE else "medium" if side <= MEDIUM_SIDE else "large"


def default_model(side: int) -> tuple[str, int]:
    """(model, resolution) for images of this longer side where nothing is timed (runs without the
    plan): the small-image nano ViT at 32 px, the fast one at 64 px, the pretrained model for large photos."""
    kind = image_class(side)
    if kind == "large":
        return PRETRAINED_MODEL, get_model_card(PRETRAINED_MODEL).input_size[1]
    c = SCRATCH["small"][0] if kind == "small" else SCRATCH["medium"][-1]
    return c.name, c.img_size


def candidates(info: DatasetInfo, pretrained: str | None, init: Candidate | None = None,
               user_init: bool = False) -> list[Candidate]:
    """Models to calibrate for this data, most capable first. ``init``: the architecture the user's
    ``model.init`` records; ``user_init``: the user gave weights (of an unrecorded architecture).
    Photos with pretrained weights (the plan's ``pretrained`` hub id, or the user's) take the
    pretrained model (:func:`~vitkit.plan_peft.pretrained_candidates`)."""
    if init is not None:
        return [init]
    kind = image_class(max(info.typical_size))
    if kind != "small" and (pretrained or user_init):
        return pretrained_candidates(PRETRAINED_MODEL, pretrained)
    return list(SCRATCH["small" if kind == "small" else "medium"])


def cpu_budget_s(n_train: int) -> float:
    """The CPU budget: 10 min up to 50k images, proportionally more beyond, at most 1 h (whole minutes)."""
    s = CPU_BUDGET_S * max(1.0, n_train / CPU_BUDGET_IMAGES)
    return min(CPU_BUDGET_MAX_S, 60.0 * math.ceil(s / 60.0))


def planned_budget_s(n_train: int, user: dict[str, object], device: str) -> float | None:
    """The run's time budget: the user's, else :func:`cpu_budget_s` on a CPU unless epochs were set."""
    if "engine.time_budget" in user:
        return parse_duration(user["engine.time_budget"])
    if "engine.epochs" in user or device == "cuda":
        return None
    return cpu_budget_s(n_train)


def gpu_epochs(n_train: int, finetune: bool) -> int:
    """GPU length in epochs: about 1.5M samples from scratch (30-300 epochs), 300k to fine-tune (10-50)."""
    if finetune:
        return int(min(50, max(FINETUNE_MIN_EPOCHS, round(3e5 / max(1, n_train)))))
    return int(min(300, max(30, round(1.5e6 / max(1, n_train)))))


def planned_batch(n_train: int, device: str, finetune: bool) -> int:
    """128 (256 on a GPU, 32/64 to fine-tune), smaller for small datasets so an epoch has >= 30 steps."""
    top = (64 if device == "cuda" else 32) if finetune else (256 if device == "cuda" else 128)
    fit = 2 ** int(math.log2(max(1, n_train // 30)))
    return int(max(16, min(top, fit)))


def aug_strength(epochs: float) -> float:
    """0 at ``LIGHT_EPOCHS`` passes or fewer, 1 at ``STRONG_EPOCHS`` or more, log-linear between."""
    if epochs <= LIGHT_EPOCHS:
        return 0.0
    return min(1.0, math.log(epochs / LIGHT_EPOCHS) / math.log(STRONG_EPOCHS / LIGHT_EPOCHS))


def crop_scale_min(epochs: float, finetune: bool = False) -> float:
    """Smallest crop area for ~``epochs`` passes: 1 (whole images) up to ``FEW_EPOCHS`` passes from
    scratch, then 0.5 at ``LIGHT_EPOCHS`` (log-linear), then down to 0.25 with the augmentation strength.
    Fine-tuning starts at 0.5: a pretrained model fits a few passes without underfitting."""
    if not finetune and epochs < LIGHT_EPOCHS:
        if epochs <= FEW_EPOCHS:
            return 1.0
        return round(1.0 - 0.5 * math.log(epochs / FEW_EPOCHS) / math.log(LIGHT_EPOCHS / FEW_EPOCHS), 2)
    return round(0.5 - 0.25 * aug_strength(epochs), 2)


def _train_rate(calib: Calibration, cand: Candidate) -> float:
    # Decoding runs in loader workers on the same cores: counted in series, to be safe.
    model_s = 1.0 / max(calib.img_per_s[cand.key], 1e-6)
    return 1.0 / (model_s + calib.decode_s)


def _first_stage_tokens(cand: Candidate) -> int:
    """Tokens in the candidate's first feature map at its resolution, asked of the model itself."""
    return math.ceil(cand.img_size / first_stride(cand.name, cand.img_size, cand.args)) ** 2


def _model_reason(info: DatasetInfo, calib: Calibration, cands: list[Candidate], cand: Candidate, epochs, user) -> str:
    h, w = info.typical_size
    side = max(h, w)
    fit = f"~{_ep(epochs(cand))} epochs fit at {_train_rate(calib, cand):.0f} img/s"
    if cand is calib.init:
        return f"the architecture model.init={user['model.init']} records, at its {cand.img_size} px; {fit}"
    if cand.pretrained or (cand.name == PRETRAINED_MODEL and user.get("model.init")):
        full = _ep(epochs(cands[0])) if cands[0].key in calib.img_per_s else None
        return finetune_reason(side, cands, cand, fit, full)
    if image_class(side) != "small":
        return (f"{side} px photos, from scratch at {cand.img_size} px, where a CPU can learn from "
                f"{info.n_train:,} images ({calib.pretrained_error or 'no usable pretrained weights'}); {fit}")
    return f"{h}x{w} images: {_first_stage_tokens(cand)} tokens at {cand.img_size} px; {fit}"


def make_plan(info: DatasetInfo, calib: Calibration, user: dict[str, object]) -> Plan:
    """The plan for ``info`` on the calibrated machine. ``user``: dotted keys the user set, with values.

    Keys the user set are never planned; choices that depend on them use the user's value.
    """
    plan = Plan()
    n = max(1, info.n_train)
    side = max(info.typical_size)
    cands = candidates(info, calib.pretrained, calib.init, bool(user.get("model.init")))
    # Fine-tuning: from the plan's own pretrained weights, or from the user's model.init.
    finetune = (cands[0].pretrained is not None and "model.name" not in user) or bool(user.get("model.init"))
    need = FINETUNE_MIN_EPOCHS if finetune else MIN_EPOCHS

    # Length: a time budget on a CPU, epochs on a GPU.
    budget_s = planned_budget_s(n, user, calib.device)
    if budget_s is not None and "engine.time_budget" not in user:
        plan.set("engine.time_budget", f"{budget_s / 60:g}m",
                 f"CPU run: 10 min for up to {CPU_BUDGET_IMAGES:,} images ({n:,} here), at most 1 h")

    def expected_epochs(cand: Candidate) -> float:
        if budget_s is None:
            return float(user.get("engine.epochs") or gpu_epochs(n, finetune))
        return _train_rate(calib, cand) * 0.9 * budget_s / n  # ~10% for startup and the final eval

    # Model and resolution.
    if "model.name" in user:
        cand = Candidate(str(user["model.name"]), int(user.get("data.img_size") or cands[0].img_size))
        if cand.key not in calib.img_per_s:
            calib.img_per_s[cand.key] = calib.img_per_s[cands[-1].key]
    else:
        cand = cands[-1]
        for c in cands:
            if c is cands[-1] or (c.key in calib.img_per_s and expected_epochs(c) >= need):
                cand = c
                break
        plan.set("model.name", cand.name, _model_reason(info, calib, cands, cand, expected_epochs, user))
        if "data.img_size" not in user:
            plan.set("data.img_size", cand.img_size, "the model's resolution for this image size")
        if cand.args and "model.args" not in user:
            plan.set("model.args", dict(cand.args), "the architecture model.init records" if cand is calib.init
                     else "the wider conv stem of the fast small-image recipe")
        if cand.pretrained and "model.init" not in user:
            plan.set("model.init", cand.pretrained, "ImageNet weights: few images train far better from them")
    epochs = expected_epochs(cand)
    plan.img_per_s = _train_rate(calib, cand)
    plan.eval_img_per_s = calib.eval_img_per_s.get(cand.key)
    if side <= MEDIUM_SIDE and "data.crop_pct" not in user:
        plan.set("data.crop_pct", 1.0, "small images: evaluate on the whole image, no centre crop")

    init = user.get("model.init") or cand.pretrained
    peft = plan_peft(plan, n, (cand.name, cand.img_size, user.get("model.args") or dict(cand.args)), user, init)
    batch = int(user.get("data.batch_size") or planned_batch(n, calib.device, finetune))
    if "data.batch_size" not in user:
        plan.set("data.batch_size", batch, f"{n:,} training images: >= 30 steps per epoch, at most "
                                           f"{planned_batch(10**9, calib.device, finetune)}")

    # Optimiser and schedule.
    def lr_per_512(lr_128: float) -> float:
        # optim.lr is per batch 512 and the engine scales it linearly to the batch.
        return float(f"{lr_128 * math.sqrt(batch / 128) * 512 / batch:.3g}")

    lr_128, kind = (PEFT_LR_128, f"{peft}, frozen base") if peft else \
        (FINETUNE_LR_128, "fine-tuning") if finetune else (SCRATCH_LR_128, "from scratch")
    lr_why = f"AdamW {lr_128 * math.sqrt(batch / 128):.2g} at batch {batch} ({kind}; per 512 in the config)"
    plan.set("optim.lr", lr_per_512(lr_128), lr_why)
    if finetune or peft:
        set_finetune_recipe(plan, peft, user)
    else:
        plan.set("schedule.name", "onecycle", "from scratch: one cycle, annealed at the end of the run")
    warm = round(min(5.0, max(0.3, 0.03 * epochs)), 2)
    plan.set("schedule.warmup_epochs", warm, f"3% of ~{_ep(epochs)} epochs (0.3-5)")

    # Augmentation and regularisation from the expected number of passes.
    s = aug_strength(epochs)
    level = "light" if s == 0 else ("DeiT-strength" if s >= 1 else f"{s:.0%} of DeiT")
    why = f"~{_ep(epochs)} epochs: {level} augmentation"
    scale_min = crop_scale_min(epochs, finetune)
    plan.set("data.scale_min", scale_min, f"~{_ep(epochs)} epochs from scratch underfit: whole images, flips only"
             if scale_min == 1.0 else why)
    plan.set("data.auto_augment", f"rand-m{round(3 + 6 * s)}-mstd0.5-inc1" if s >= 0.3 else None, why)
    plan.set("data.re_prob", round(0.25 * s, 2) if s >= 0.5 else 0.0, why)
    mix = s >= 0.6
    plan.set("data.mixup", round(0.8 * s, 2) if mix else 0.0, why)
    plan.set("data.cutmix", round(1.0 * s, 2) if mix else 0.0, why)
    plan.set("data.label_smoothing", 0.1 if s >= 0.2 else 0.0, why)
    plan.set("model.drop_path_rate", 0.1 if finetune else round(0.1 * s, 2), why)

    steps = epochs * n / batch
    if s >= 0.5 and steps >= 500:
        decay = min(0.9999, max(0.99, 1 - 10 / steps))
        plan.set("engine.ema_decay", round(decay, 5), f"~{steps:.0f} noisy steps: average the last ~10%")
    else:
        plan.set("engine.ema_decay", None, f"~{steps:.0f} steps: the annealed weights need no average")

    plan_speed_and_eval(plan, finetune, user)
    plan_data_path(plan, info, calib.device, user, cand.img_size, int(user.get("data.in_chans") or info.in_chans))
    set_run_length(plan, epochs, n, budget_s, user)
    plan_plateau(plan, info.n_val, epochs, user, run_s=budget_s or epochs * n / max(plan.img_per_s, 1e-6))
    plan_classes(info, plan, user)
    for k in [k for k in plan.values if k in user]:
        del plan.values[k], plan.reasons[k]
    return plan


def plan_classes(info: DatasetInfo, plan: Plan, user) -> None:
    """Notes on the class counts, and ``data.balance`` above ``BALANCE_RATIO`` of imbalance."""
    counts = list(info.class_counts)
    if not counts:
        return
    names = list(info.classes) or [str(i) for i in range(len(counts))]
    pairs = ", ".join(f"{c}={k}" for c, k in zip(names, counts))
    ratio = max(counts) / max(1, min(counts))
    balance = "balanced" if ratio <= 1.5 else f"imbalanced {ratio:.1f}:1 (watch balanced accuracy)"
    plan.notes.append(f"{len(counts)} classes, {balance}; train images per class: {pairs}")
    if ratio > BALANCE_RATIO and "data.balance" not in user:
        plan.set("data.balance", BALANCE, f"classes imbalanced {ratio:.1f}:1 (> {BALANCE_RATIO:g}:1): each class "
                                          "drawn equally often, for balanced accuracy; data.balance=none keeps the mix")
    few = [c for c, k in zip(names, counts) if k < MIN_CLASS_IMAGES]
    if few:
        plan.notes.append(f"classes with fewer than {MIN_CLASS_IMAGES} training images: {few}; "
                          "their accuracy will be unreliable, add images if you can")


def calibrate(info: DatasetInfo, dataset, cfg, user: dict[str, object], device) -> Calibration:
    """Time the candidate models and the image pipeline here (a few seconds).

    Photos look for the pretrained model's weights first (and load them once: a broken file means
    from scratch). The fastest candidate is timed first; a more capable one only when the budget
    would give the fast one enough passes (else the slower one cannot qualify).
    """
    in_chans = cfg.data.in_chans or info.in_chans
    named, init_src = "model.name" in user, user.get("model.init")
    init = None if named else init_candidate(init_src)
    pretrained = error = None
    if image_class(max(info.typical_size)) != "small" and not named and not init_src:
        pretrained, error = usable_pretrained(PRETRAINED_MODEL, in_chans, cfg.data.num_classes or info.num_classes)
    cands = candidates(info, pretrained, init, bool(init_src))
    if named:
        cands = [Candidate(str(user["model.name"]), int(user.get("data.img_size") or cands[0].img_size),
                           tuple(dict(cfg.model.args).items()))]
    finetune = cands[0].pretrained is not None or bool(init_src)
    batch = int(user.get("data.batch_size") or planned_batch(info.n_train, device.type, finetune))
    amp_dtype = resolve_amp(cfg.engine.amp, device)
    calib = Calibration(device.type, {}, time_decode(dataset, cands[0].img_size, in_chans), pretrained,
                        pretrained_error=error, init=init)
    budget_s = planned_budget_s(info.n_train, user, device.type)
    need = FINETUNE_MIN_EPOCHS if finetune else MIN_EPOCHS
    for c in reversed(cands):
        calib.img_per_s[c.key], calib.eval_img_per_s[c.key] = time_model(
            c.name, c.img_size, dict(c.args), in_chans, info.num_classes, batch, device, amp_dtype
        )
        if budget_s is not None and _train_rate(calib, c) * 0.9 * budget_s / max(1, info.n_train) < need:
            break
    return calib


def plan_run(cfg, info: DatasetInfo, dataset, user_keys, device, verbose: bool = True) -> Plan:
    """Calibrate, plan and apply the plan to ``cfg``; prints the plan. Returns it."""
    user = user_values(cfg, user_keys)
    with torch.random.fork_rng(devices=[]):  # timing must not shift the run's model init
        calib = calibrate(info, dataset, cfg, user, device)
    plan = make_plan(info, calib, user)
    apply_plan(cfg, plan)
    rates = ", ".join(f"{k} {v:.0f} img/s" for k, v in calib.img_per_s.items())
    plan.notes.append(f"calibration on {calib.device}: {rates}; decode+crop {calib.decode_s * 1e3:.1f} ms/image")
    if verbose:
        print("\n".join(plan.lines()), flush=True)
    for n in plan.notes:
        if "fewer than" in n:
            warnings.warn(n, stacklevel=2)
    return plan
