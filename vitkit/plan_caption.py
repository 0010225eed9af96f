"""The data-aware plan for image-text data: what ``vitkit train --data captions.jsonl`` trains with no flags.

The counterpart of :mod:`vitkit.plan` and :mod:`vitkit.plan_detect` for captioned images, stated in
the same ``key=value  # reason`` lines. Every rule reads only the data's statistics (training
images, their typical size, captions per image) and a short timing on this machine:

- **Model.** ``clip_nano`` (a conv-stem nano image tower at 64 px and a small causal text tower)
  on a CPU or for fewer than ``LARGE_DATA`` images; ``clip_vit_b16`` at 224 px on a GPU with
  more. ``model.name`` may name any registered two-tower model, or an image backbone with
  ``model.head=clip|siglip`` (a text tower and projections are built around it).
- **Objective.** ``siglip`` for ``siglip_*`` models and ``model.head=siglip``, else ``clip``.
- **SigLIP's logit bias.** The paper starts the bias at -10 so that training "starts close to the
  prior": -10 is about the log-odds that a pair of its 32k batch is a positive one, -ln(32767) =
  -10.4. At a smaller batch the same rule gives -ln(B - 1) for a global batch of B (-4.8 at 128), which
  the plan sets on a model trained from scratch: at -10 and a batch of 128 the negatives' gradient
  starts ~250x weaker than the positives' (128 x sigmoid(-10) against 1). Measured on shapes-captions
  (``benchmarks/results/clip.json``): 23.4% zero-shot against 18.6% at -10 in 15 minutes, a gain but
  not what keeps SigLIP behind CLIP there. ``model.head_args.init_logit_bias`` (or
  ``model.args.init_logit_bias``) set by the user wins.
- **Batch.** Contrastive losses learn from the other pairs of the batch (in-batch negatives), so
  the batch is as large as the data allows while an epoch keeps ``MIN_STEPS`` steps: the largest
  power of two <= n_train / MIN_STEPS, between ``MIN_BATCH`` and ``MAX_BATCH`` (per device).
- **Optimiser.** AdamW with CLIP's betas (0.9, 0.98) and eps 1e-6, weight decay 0.2 (the paper's),
  lr ``LR_256`` at a batch of 256, square-root scaled; warmup then cosine.
- **Augmentation.** A mild random resized crop (``SCALE_MIN``), no colour changes (captions name
  colours), no mixing. Horizontal flips only where fewer than ``SIDED_MAX`` of the training captions
  name a side ("left", "right"): a flip would make those wrong (CLIP itself trains with crops alone).
- **Length.** On a CPU a wall-clock budget (15 min up to 2,000 images, proportionally more, at
  most an hour); on a GPU epochs (more passes for fewer images).
- **Which weights.** A few hundred captioned images are memorised long before a budget ends (on
  Flickr800's 630 training photos the in-batch accuracy reaches ~100% by epoch ~70 of ~185). So the
  run evaluates ``CAPTION_EVALS`` times when that costs at most ``EVAL_COST`` of it (the curve shows
  where recall peaks), and with ``END_ON_BEST_MIN_VAL`` validation images or more it ends on the best
  of them (``engine.end_on_best``, as HF Trainer's ``load_best_model_at_end``); fewer images are too
  noisy to choose among evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .engine.budget import parse_duration
from .engine.runtime import resolve_amp
from .plan import Calibration, Plan, apply_plan, user_values
from .plan_dense import time_transform, train_eval_rates
from .plan_eval import PLATEAU_MIN_VAL, set_run_length

CPU_MODEL, GPU_MODEL = "clip_nano", "clip_vit_b16"
LARGE_DATA = 50_000
HEADS = ("clip", "siglip")
MIN_STEPS, MIN_BATCH, MAX_BATCH = 20, 8, {"cpu": 128, "cuda": 256}
LR_256 = 1e-3  # AdamW lr at a batch of 256 for small two-tower models from scratch
FINETUNE_LR_256 = 3e-4  # with a pretrained image tower (model.init)
SCALE_MIN = 0.9
SIDED_MAX = 0.01  # flips when fewer than 1% of the captions say "left" or "right"
BUDGET_S, BUDGET_IMAGES, BUDGET_MAX_S = 900.0, 2_000, 3600.0
CALIB_BATCH = 16
CAPTION_EVALS, EVAL_COST = 20, 0.05
# Choosing among evaluations needs the early stop's floor of validation images (plan_eval.PLATEAU_MIN_VAL): on
# Flickr800's 70-image monitoring tenth the best of 22 evaluations (epoch 77) scored no better on the held-out
# photos than the last (mean recall 15.4% against 16.7%; benchmarks/results/clip.json).
END_ON_BEST_MIN_VAL = PLATEAU_MIN_VAL


@dataclass
class CaptionInfo:
    """What the plan reads of image-text data (the stage's ``info`` and the training split's ``stats()``)."""

    typical_size: tuple[int, int]
    n_train: int
    n_val: int
    in_chans: int = 3
    captions_per_image: float = 1.0
    caption_words: float = 0.0
    sided_captions: float = 0.0  # the share of captions naming a side ("left", "right")
    classes: tuple[str, ...] = ()
    format: str = ""
    reason: str = ""


@dataclass
class CaptionChoice:
    """The model (a registered two-tower name, or an image backbone with ``head``), its image size and
    objective, with the sentence that says why."""

    model: str
    head: str | None  # clip | siglip around an image backbone; None: ``model`` is a registered two-tower
    img_size: int
    objective: str
    reason: str


def _get(obj, key, default=None):
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def caption_info(data) -> CaptionInfo:
    """The plan's view of a caption :class:`~vitkit.data.stage.DataStage`."""
    info, train = data.info, data.train
    stats = train.stats() if callable(getattr(train, "stats", None)) else {}
    size = _get(info, "typical_size") or stats.get("typical_size") or (224, 224)
    n_train, n_val = _get(info, "n_train"), _get(info, "n_val")
    classes = _get(info, "classes") or getattr(train, "classes", None) or ()
    return CaptionInfo(
        typical_size=(int(size[0]), int(size[1])),
        n_train=int(n_train if n_train is not None else len(train)),
        n_val=int(n_val if n_val is not None else len(data.val)),
        in_chans=3,
        captions_per_image=float(stats.get("captions_per_image") or _get(info, "captions_per_image") or 1.0),
        caption_words=float(stats.get("caption_words") or 0.0),
        sided_captions=float(stats.get("sided_captions") or 0.0),
        classes=tuple(str(c) for c in classes),
        format=str(_get(info, "format") or getattr(train, "format", "")),
        reason=str(getattr(data, "reason", "") or ""),
    )


def is_two_tower(name: str | None) -> bool:
    from .clip import list_clip_models

    return bool(name) and name in list_clip_models()


def default_model(info: CaptionInfo, device: str) -> tuple[str, str]:
    """(registered two-tower name, why) without ``model.name``."""
    if device == "cuda" and info.n_train >= LARGE_DATA:
        return GPU_MODEL, f"{info.n_train:,} image-text pairs on a GPU: a ViT-B/16 CLIP has the data to learn"
    where = "on a CPU" if device != "cuda" else f"({info.n_train:,} pairs, < {LARGE_DATA:,})"
    return CPU_MODEL, f"{where}: a nano two-tower model (conv-stem ViT, small causal text tower) trains in minutes"


def default_objective(model: str, head: str | None) -> str:
    return "siglip" if head == "siglip" or (head is None and model.startswith("siglip")) else "clip"


def tower_size(model) -> int:
    """The input side a two-tower model's image tower was built for."""
    card = getattr(model, "card", None) or getattr(model.visual, "card", None)
    if card is not None:
        return int(card.input_size[-1])
    size = getattr(getattr(model.visual, "patch_embed", None), "img_size", 224)
    return int(size[-1] if isinstance(size, (tuple, list)) else size)


def choose_caption(cfg, info: CaptionInfo, device: str = "cpu", model=None) -> CaptionChoice:
    """Model, image size and objective from the config (the plan wrote its choices there), else defaults;
    ``model``: the built two-tower model (its input side is the image size when ``data.img_size`` is unset,
    its kind the objective when ``objective.name`` is)."""
    from .errors import ConfigError

    head = cfg.model.head
    if head is not None and head not in HEADS:
        raise ConfigError(f"model.head={head} is not a two-tower head for caption data: use model.head=clip or "
                          "model.head=siglip around an image backbone, or drop model.head")
    name, why = cfg.model.name, "as configured"
    if not name:
        name, why = default_model(info, device)
    elif head is None and not is_two_tower(name):
        from .clip import list_clip_models

        raise ConfigError(
            f"model.name={name} is not a two-tower model ({', '.join(list_clip_models())}): name one of those, or "
            f"add model.head=clip (or siglip) to build one around the image backbone {name}"
        )
    if head is not None and is_two_tower(name):
        raise ConfigError(f"model.name={name} is already a two-tower model: drop model.head={head}")
    side = int(cfg.data.img_size or (tower_size(model) if model is not None else 224))
    objective = cfg.objective.get("name")
    if objective not in HEADS:
        objective = getattr(model, "default_objective", None) or default_objective(name, head)
    h, w = info.typical_size
    built = f"{name} + {head} text tower" if head else name
    reason = (f"task caption ({info.reason or info.format}): {info.n_train:,} training images, typically {h}x{w}, "
              f"{info.captions_per_image:.1f} captions each, so vitkit chose {built} at {side} px with the "
              f"{objective} objective ({why}; set model.name / model.head / data.img_size / objective.name to "
              "override)")
    return CaptionChoice(name, head, side, objective, reason)


def caption_budget_s(n_train: int) -> float:
    """The CPU budget: 15 min up to BUDGET_IMAGES training images, proportionally more beyond, at most 1 h."""
    s = BUDGET_S * max(1.0, n_train / BUDGET_IMAGES)
    return min(BUDGET_MAX_S, 60.0 * math.ceil(s / 60.0))


def siglip_prior_bias(global_batch: int) -> float:
    """The log-odds that a pair of a ``global_batch`` of B image-text pairs is a positive one: -ln(B - 1).

    SigLIP's initial bias follows this rule (its -10 is the value at its batch of 32k): at the start,
    when every logit is about the bias, the B - 1 negatives of an image then weigh as much in the
    gradient as its one positive.
    """
    return -math.log(max(2, int(global_batch)) - 1)


def planned_caption_batch(n_train: int, device: str) -> int:
    """The largest power of two <= n_train / MIN_STEPS, within [MIN_BATCH, MAX_BATCH[device]]."""
    top = MAX_BATCH.get(device, MAX_BATCH["cpu"])
    fit = 2 ** int(math.log2(max(1, n_train // MIN_STEPS)))
    return int(max(MIN_BATCH, min(top, fit)))


@dataclass
class CaptionCalibration(Calibration):
    """A :class:`~vitkit.plan.Calibration` of the planned two-tower model at ``img_size``."""

    img_size: int = 0
    params: int = 0


def time_two_tower(model, side: int, batch: int, device, amp_dtype, min_s: float = 1.0,
                   max_steps: int = 4) -> tuple[float, float]:
    """(training pairs/s, evaluation pairs/s) of a two-tower ``model``: forward both towers on random images
    and tokens, a symmetric InfoNCE over the batch, backward and an update; forward-only for evaluation."""
    model = model.to(device).train()
    x = torch.randn(batch, 3, side, side, device=device)
    ctx = int(model.text.context_length)
    tokens = torch.randint(1, int(model.text.vocab_size) - 1, (batch, ctx), device=device)
    labels = torch.arange(batch, device=device)

    def loss():
        out = model(x, tokens)
        logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].t()
        return torch.nn.functional.cross_entropy(logits.float(), labels)

    return train_eval_rates(model, loss, lambda: model(x, tokens), batch, device, amp_dtype, min_s, max_steps)


def calibrate_caption(info: CaptionInfo, dataset, choice: CaptionChoice, model, cfg, user: dict,
                      device) -> CaptionCalibration:
    """Time the planned model at the planned size and the caption transform (a few seconds)."""
    from .data.captions import CaptionTransform

    batch = min(CALIB_BATCH, int(user.get("data.batch_size") or planned_caption_batch(info.n_train, device.type)))
    amp_dtype = resolve_amp(cfg.engine.amp, device)
    train_rate, eval_rate = time_two_tower(model, choice.img_size, max(2, batch), device, amp_dtype)
    decode_s = time_transform(dataset, CaptionTransform(choice.img_size, train=True), 16)
    return CaptionCalibration(device.type, {choice.model: train_rate}, decode_s,
                              eval_img_per_s={choice.model: eval_rate}, img_size=choice.img_size,
                              params=sum(p.numel() for p in model.parameters()))


def make_caption_plan(info: CaptionInfo, calib: CaptionCalibration, user: dict[str, object],
                      choice: CaptionChoice, finetune: bool = False, world_size: int = 1) -> Plan:
    """The plan for image-text data ``info`` on the calibrated machine; ``user``: the keys the user set
    (``model.args`` / ``model.head_args``: their dicts); ``world_size``: the processes sharing a batch.

    Pure: tests check it on made-up statistics and timings.
    """
    plan = Plan()
    n = max(1, info.n_train)
    device = calib.device
    if "model.name" not in user:
        plan.set("model.name", choice.model, default_model(info, device)[1])
    if "objective.name" not in user:
        plan.set("objective.name", choice.objective,
                 "SigLIP's pairwise sigmoid loss for a SigLIP model" if choice.objective == "siglip" else
                 "CLIP's symmetric InfoNCE (softmax over the batch both ways)")
    if "data.img_size" not in user:
        plan.set("data.img_size", choice.img_size, "the image tower's own input size")
    if "engine.time_budget" in user:
        budget_s = parse_duration(user["engine.time_budget"])
    elif "engine.epochs" in user or device == "cuda":
        budget_s = None
    else:
        budget_s = caption_budget_s(n)
        plan.set("engine.time_budget", f"{budget_s / 60:g}m",
                 f"CPU image-text run: 15 min for up to {BUDGET_IMAGES:,} images ({n:,} here), at most 1 h")
    rate = calib.img_per_s.get(choice.model) or next(iter(calib.img_per_s.values()), 1.0)
    rate = 1.0 / (1.0 / max(rate, 1e-6) + calib.decode_s)  # decoding shares the cores: counted in series
    if budget_s is None:
        epochs = float(user.get("engine.epochs") or min(200, max(20, round(2e5 / n))))
    else:
        epochs = rate * 0.9 * budget_s / n
    plan.img_per_s, plan.eval_img_per_s = rate, calib.eval_img_per_s.get(choice.model)
    batch = int(user.get("data.batch_size") or planned_caption_batch(n, device))
    if "data.batch_size" not in user:
        plan.set("data.batch_size", batch, f"{n:,} training images: in-batch negatives want a large batch, an epoch "
                                           f">= {MIN_STEPS} steps; {MIN_BATCH}-{MAX_BATCH.get(device, 128)}")
    bias_set = any("init_logit_bias" in dict(user.get(k) or {}) for k in ("model.args", "model.head_args"))
    if choice.objective == "siglip" and not bias_set:
        global_batch = batch * max(1, int(world_size))
        plan.set("model.head_args.init_logit_bias", round(siglip_prior_bias(global_batch), 3),
                 f"SigLIP's bias starts at the prior log-odds of a positive pair, -ln(B-1) at a global batch of "
                 f"{global_batch} (the paper's -10 is this at its batch of 32k)")
    base = FINETUNE_LR_256 if finetune else LR_256
    eff = base * math.sqrt(batch / 256)
    plan.set("optim.lr", float(f"{eff * 512 / batch:.3g}"),
             f"AdamW {eff:.2g} at batch {batch} ({'from a pretrained image tower' if finetune else 'from scratch'}, "
             f"square-root scaled from {base:g} at 256; per 512 in the config)")
    plan.set("optim.betas", (0.9, 0.98), "CLIP's AdamW betas (a lower beta2 steadies large contrastive batches)")
    plan.set("optim.eps", 1e-6, "CLIP's AdamW eps")
    plan.set("optim.weight_decay", 0.2, "CLIP's weight decay (not on gains, biases, embeddings or the temperature)")
    plan.set("optim.clip_grad", 1.0, "the learnable temperature spikes early: clip at norm 1")
    plan.set("schedule.name", "cosine", "warmup, then cosine to the end of the run")
    plan.set("schedule.warmup_epochs", round(min(5.0, max(0.3, 0.05 * epochs)), 2),
             f"5% of ~{epochs:.0f} epochs (0.3-5)")
    plan.set("data.scale_min", SCALE_MIN, "mild random resized crops: the caption must still describe the crop")
    sided = f"{info.sided_captions:.1%} of the sampled captions name a side (left, right)"
    if info.sided_captions < SIDED_MAX:
        plan.set("data.hflip", 0.5, f"{sided}, under {SIDED_MAX:.0%}: mirrored images still match their captions")
    else:
        plan.set("data.hflip", 0.0, f"{sided}: a mirrored image would contradict them")
    plan.set("engine.ema_decay", None, "the annealed cosine weights need no average")
    set_run_length(plan, epochs, n, budget_s, user)
    plan_caption_evals(plan, info, epochs, budget_s if budget_s is not None else n * epochs / rate, user)
    plan.notes.append(f"{info.captions_per_image:.1f} captions per image"
                      + (f", {info.caption_words:.1f} words each on average" if info.caption_words else "")
                      + (f"; classes {', '.join(info.classes[:10])}: zero-shot accuracy is evaluated too"
                         if info.classes else ""))
    for k in [k for k in plan.values if k in user]:
        del plan.values[k], plan.reasons[k]
    return plan


def plan_caption_evals(plan: Plan, info: CaptionInfo, epochs: float, run_s: float, user=()) -> None:
    """``engine.eval_every`` for ``CAPTION_EVALS`` evaluations when they take at most ``EVAL_COST`` of the
    ``run_s`` seconds (an evaluation encodes every validation image and caption: counted as
    ``n_val x captions_per_image`` pairs at the calibrated evaluation rate), and ``engine.end_on_best``
    with ``END_ON_BEST_MIN_VAL`` validation images or more; ``user``: the keys the user set."""
    eval_rate = plan.eval_img_per_s or 3 * (plan.img_per_s or 1.0)
    eval_s = info.n_val * max(1.0, info.captions_per_image) / eval_rate
    every = max(1, math.floor(epochs / CAPTION_EVALS))
    if every < plan.values.get("engine.eval_every", every + 1) and CAPTION_EVALS * eval_s <= EVAL_COST * run_s:
        plan.set("engine.eval_every", every,
                 f"~{CAPTION_EVALS} evaluations (~{eval_s:.1f} s each, <= {EVAL_COST:.0%} of the run): often enough "
                 "to see where held-out recall peaks")
    if info.n_val >= END_ON_BEST_MIN_VAL:
        plan.set("engine.end_on_best", True,
                 f"end on the evaluation with the best recall on the {info.n_val:,} validation images (>= "
                 f"{END_ON_BEST_MIN_VAL}, enough to choose among evaluations): a caption set can be memorised "
                 "before the budget ends")
    elif "engine.end_on_best" not in user:
        plan.notes.append(f"the run keeps its last weights: {info.n_val} validation images are too few "
                          f"(< {END_ON_BEST_MIN_VAL}) to choose among evaluations")


def planned_logit_bias(model, plan: Plan | None) -> float | None:
    """Set the planned SigLIP bias on a ``model`` built before the plan; returns it (None: nothing planned)."""
    value = None if plan is None else plan.values.get("model.head_args.init_logit_bias")
    if value is None or getattr(model, "logit_bias", None) is None:
        return None
    with torch.no_grad():
        model.logit_bias.fill_(float(value))
    model.init_logit_bias = float(value)
    return float(value)


def plan_caption_run(cfg, info: CaptionInfo, dataset, choice: CaptionChoice, model, user_keys, device,
                     verbose: bool = True, world_size: int = 1) -> Plan:
    """Calibrate ``model`` (the run's, before training), plan, apply the plan to ``cfg`` and to ``model`` (SigLIP's
    initial bias); prints the plan."""
    user = user_values(cfg, user_keys)
    with torch.random.fork_rng(devices=[]):  # timing must not shift anything the run draws
        import copy

        calib = calibrate_caption(info, dataset, choice, copy.deepcopy(model), cfg, user, device)
    plan = make_caption_plan(info, calib, user, choice, finetune=bool(cfg.model.init), world_size=world_size)
    apply_plan(cfg, plan)
    planned_logit_bias(model, plan)
    plan.notes[:0] = [f"task caption ({info.reason or info.format}): {info.n_train:,} training and {info.n_val:,} "
                      f"validation images, typically {info.typical_size[0]}x{info.typical_size[1]}"]
    plan.notes.append(f"calibration on {calib.device} at {calib.img_size} px: {choice.model} "
                      f"{calib.img_per_s[choice.model]:.1f} pairs/s ({calib.params / 1e6:.1f}M params); "
                      f"decode+crop {calib.decode_s * 1e3:.1f} ms/image")
    if verbose:
        print("\n".join(plan.lines()), flush=True)
    return plan


__all__ = ["CaptionCalibration", "CaptionChoice", "CaptionInfo", "caption_budget_s", "caption_info",
           "choose_caption", "make_caption_plan", "plan_caption_evals", "plan_caption_run", "planned_caption_batch",
           "planned_logit_bias", "siglip_prior_bias"]
