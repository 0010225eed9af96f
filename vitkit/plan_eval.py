"""The plan's rules for a run's length and evaluation: how long (``set_run_length``), when to stop
early (``plan_plateau``), and how to evaluate and lay out memory (``plan_speed_and_eval``).
Shared by the classification plan (:mod:`vitkit.plan`) and the dense, detection and caption plans."""

from __future__ import annotations

import math

from .config import DataConfig
from .plan_calibrate import Plan

# Early stop. Under PLATEAU_MIN_VAL validation images one image moves accuracy by >= 0.5%: too
# coarse to tell a plateau from noise. PLATEAU_PATIENCE (provisional: a share of the run, not yet
# swept) holds PLATEAU_EVALS evaluations, so that one noisy evaluation does not decide; with a
# tenth held out and evaluation ~3x faster than training they cost under 4% of the run (computed:
# at most 16 evaluations of n/9 images at 3x the rate, over at least 16 epochs).
PLATEAU_MIN_VAL, PLATEAU_PATIENCE, PLATEAU_EVALS = 200, 0.25, 4
# The watch's evaluations may take at most this share of the run (a design bound, not swept): a large
# validation split of the user's own, or flip averaging, can make them cost more (the 10:1 Fashion-MNIST
# row of benchmarks/defaults.py: 4,086 test images every 2 epochs with flip averaging took ~10% of its
# 10 minutes). Then the plan does not watch; the run evaluates about twice and ends at its budget.
PLATEAU_COST = 0.05
# Under a time budget engine.epochs is only a cap, at CAP_FACTOR times the calibrated passes (at least
# CAP_MIN_EPOCHS). The lr schedule follows the larger of time and step progress, so a cap that binds
# anneals and ends the run early: the 60,000-image Fashion-MNIST row of benchmarks/defaults.py, calibrated
# at 55 img/s while another process held a core (it trains at ~340), was capped at 2 passes under the
# earlier 3x and ended after 288 s of its 720 (~4 passes on that day's machine).
CAP_FACTOR, CAP_MIN_EPOCHS = 10.0, 10


def _ep(epochs: float) -> str:
    return f"{epochs:.1f}" if epochs < 10 else f"{epochs:.0f}"


def plan_speed_and_eval(plan: Plan, finetune: bool, user) -> None:
    """Channels-last memory for the conv-stem models trained from scratch (+4-8% img/s on the CPU,
    ``benchmarks/results/cifar10.json``), and flip averaging at evaluation when training flips the
    images (the flipped view is then as much the class as the image: +1.15 points for the same
    weights on CIFAR-10, ``cifar10.json``'s ``test_acc_without_tta``)."""
    if not finetune:
        plan.set("engine.channels_last", True, "conv stem: channels-last convolutions train 4-8% faster on a CPU")
    hflip = float(user.get("data.hflip", DataConfig.hflip))
    if "objective.name" not in user and hflip > 0:
        plan.set("objective.tta", "hflip", f"training flips images (data.hflip={hflip:g}): evaluate each image "
                                           "and its mirror image, averaged")


def set_run_length(plan: Plan, epochs: float, n: int, budget_s: float | None, user) -> None:
    """``engine.epochs`` and ``engine.eval_every`` for ~``epochs`` passes over ``n`` images: under a time
    budget the epochs are only a cap; without one (a GPU) they are the run's length."""
    if budget_s is not None:
        # Generous: a calibration slowed by another process underestimates the passes, and a tight cap
        # would then end (and anneal) the run long before its budget.
        plan.set("engine.epochs", max(CAP_MIN_EPOCHS, math.ceil(CAP_FACTOR * epochs)),
                 f"a cap only ({CAP_FACTOR:g}x the expected passes): the time budget ends the run")
        plan.set("engine.eval_every", max(1, math.ceil(epochs / 2)),
                 "evaluate about once midway and at the end: the budget goes to training")
    else:
        if "engine.epochs" not in user:
            plan.set("engine.epochs", round(epochs), f"GPU: about {round(epochs)} passes over {n:,} images")
        plan.set("engine.eval_every", max(1, round(epochs / 10)), "about 10 evaluations over the run")


def plan_plateau(plan: Plan, n_val: int, epochs: float, user, run_s: float | None = None) -> None:
    """``engine.plateau_patience`` (and evaluations often enough to see a plateau) when the plan set the
    run's length, the validation set has ``PLATEAU_MIN_VAL`` images or more, ~``epochs`` passes leave
    room for ``PLATEAU_EVALS`` evaluations, at most one per epoch, inside the patience window, and those
    evaluations (at the plan's evaluation rate, with its flip averaging) take at most ``PLATEAU_COST`` of
    the run (``run_s`` seconds)."""
    if {"engine.epochs", "engine.time_budget", "engine.max_steps", "engine.plateau_patience"} & set(user):
        return  # the user chose the run's length (or the rule): it is kept
    if n_val < PLATEAU_MIN_VAL or epochs * PLATEAU_PATIENCE < PLATEAU_EVALS:
        return
    evals = PLATEAU_EVALS / PLATEAU_PATIENCE
    views = 2 if (user.get("objective.tta") or plan.values.get("objective.tta")) == "hflip" else 1
    eval_rate = plan.eval_img_per_s or 3 * (plan.img_per_s or 0.0)  # unmeasured: forward-only ~3x a training step
    eval_s = n_val * views / eval_rate if eval_rate else None
    if eval_s is not None and run_s and evals * eval_s > PLATEAU_COST * run_s:
        plan.notes.append(f"no early stop: watching for a plateau takes ~{evals:.0f} evaluations of {n_val:,} "
                          f"validation images, ~{evals * eval_s:.0f} s of a ~{run_s:.0f} s run (over "
                          f"{PLATEAU_COST:.0%}); engine.plateau_patience={PLATEAU_PATIENCE:g} asks for it anyway")
        return
    every = max(1, math.floor(epochs * PLATEAU_PATIENCE / PLATEAU_EVALS))
    plan.set("engine.plateau_patience", PLATEAU_PATIENCE,
             f"{n_val:,} validation images (>= {PLATEAU_MIN_VAL}) can tell a plateau: once the validation metric "
             f"has not improved for {PLATEAU_PATIENCE:.0%} of the run, re-anneal and stop")
    if "engine.eval_every" not in user and every < plan.values["engine.eval_every"]:
        plan.set("engine.eval_every", every, f"{PLATEAU_EVALS} evaluations per plateau window of "
                                             f"~{_ep(epochs * PLATEAU_PATIENCE)} epochs")
