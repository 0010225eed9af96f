"""The plan's epoch thresholds and augmentation steps, measured: a small sweep that re-derives them.

The plan (``vitkit/plan.py``) sizes augmentation by the passes a run is expected to make: light
(crops and flips) up to ``LIGHT_EPOCHS`` passes, then label smoothing, RandAugment, random erasing
and mixup/cutmix switched on one after the other as its strength (0 at ``LIGHT_EPOCHS``, 1 at
``STRONG_EPOCHS``, log-linear between) passes a step each; and of its two small-image candidates it
takes the one with more tokens only when the budget still gives that one ``MIN_EPOCHS`` passes.
This sweep measures those choices on the two small rows of ``benchmarks/defaults.py`` (built the
same way, into the same cache): ``cifar10-2class`` (1,000 images, 2 classes, top-1) and
``fashion-lt`` (5,000 images, 10:1 long-tailed, balanced accuracy). The large rows would take
hours per cell; the built-in shapes data trains from the ``shapes_quick`` recipe, not the plan.

Every cell is a fresh no-flag ``vitkit train --data ROW`` process with only the keys under study
set; the plan chooses the rest (batch, lr, schedule, warm-up) as it would.

1. **Ladder** (``LADDER``): the plan's faster candidate (``FASTER``) trained for exactly E passes
   (``engine.epochs=E``, so no time budget: the plan sizes the schedule for E passes;
   ``engine.eval_every=E``: one evaluation, at the end; no EMA, no plateau stop), at five
   cumulative levels, each adding one component at DeiT's magnitude (vitkit's ``DataConfig``
   defaults), crops of at least 50% of the image throughout: ``light``; ``+smoothing`` (0.1);
   ``+randaugment`` (``rand-m9-mstd0.5-inc1``); ``+erasing`` (0.25); ``+mix`` (mixup 0.8, cutmix
   1.0, drop path 0.1: DeiT's). E in 15/30/60/120 on ``cifar10-2class``, 15/30/60 on
   ``fashion-lt`` (``LADDER_EPOCHS``).
2. **Models** (``MODELS``): the plan's two small-image candidates, the faster (patch 8 with the
   wide stem: 16 tokens at 32 px) and the larger (patch 4: 64 tokens), under the same time budget
   each (``MODEL_BUDGETS``: 1/3/9 min on ``cifar10-2class``, 3/9 min on ``fashion-lt``); the plan
   sizes augmentation from each one's own expected passes, as it does when it picks.

3. **Balance** (``BALANCE_CHOICES``): on ``fashion-lt``, the plan's run with each remedy for its
   10:1 imbalance (``data.balance``: ``none``, ``sampler``: every class drawn equally often,
   ``loss``: inverse-frequency weights in the cross-entropy), at the plan's own 10-minute budget.

Derived (``derived`` in the results), with ``tol`` the standard error of the difference of two
scores (binomial, from each run's per-class counts; one seed per cell, so this is a weak test,
and the per-cell scores are recorded for a closer look):

- ``light_epochs``: per row, the largest E up to which ``light`` scores within ``tol`` of the best
  level at every E in the grid; the estimate is the smallest over the rows (None: light already
  loses at the smallest E);
- ``steps``: per component, per row, the smallest E at which adding it gains more than ``tol``
  over the level below; the estimate is the largest over the rows (from there it helps on every
  row; None where it never helps on one), with the plan's strength at those passes
  (``aug_strength`` under the current constants);
- ``balance``: the remedy with the best balanced accuracy, and whether it beats none by more
  than ``tol``;
- ``min_epochs``: per row, the fewest passes of the larger candidate at which it scores at least
  as well as the faster one under the same budget; the estimate is the largest over the rows
  (None where it never did), and ``lost_beyond_tol_up_to``: the most passes at which it still
  scored below the faster one by more than ``tol``.

Time plan on 2 CPU cores (the faster candidate trains ~550 img/s with decoding, plus ~20 s of
startup, calibration and evaluation per run): ladder 5 levels x (225 passes over 1,000 images
+ 105 over 5,000) ~ 2 h 5 min; models 2 x (13 + 12) min ~ 50 min; balance 3 x 10 min: about 3 h 30 min. ``--run-root``
reuses finished cells by name, so the sweep can be split over quiet sessions.

    python benchmarks/plan_sweep.py --run-root runs/plan-sweep      # everything (~3 h)
    python benchmarks/plan_sweep.py --run-root runs/plan-sweep --rows cifar10-2class
    python benchmarks/plan_sweep.py --run-root runs/plan-sweep --parts models   # the models only (~50 min)
    python benchmarks/plan_sweep.py --smoke                         # the pipeline in < 1 min, to /tmp

Writes ``benchmarks/results/plan_sweep.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from pathlib import Path

from defaults import FASHION, ROWS, SMOKE_ARGS, longtail_idx, row_data, run_facts, score_se
from generate_fashion import stage

from vitkit.engine.budget import parse_duration
from vitkit.plan import LIGHT_EPOCHS, MIN_EPOCHS, STRONG_EPOCHS, aug_strength

from _common import write_json

REPO = Path(__file__).resolve().parents[1]
SWEEP_ROWS = ("cifar10-2class", "fashion-lt")
FASTER = ["model.name=vit_nano_convstem_patch8_64", "model.args.stem_width=192", "data.img_size=32"]
LARGER = ["model.name=vit_nano_convstem_patch4_32", "data.img_size=32"]
MODELS = {"faster": FASTER, "larger": LARGER}
_LIGHT = ["data.scale_min=0.5", "data.label_smoothing=0.0", "data.auto_augment=null", "data.re_prob=0.0",
          "data.mixup=0.0", "data.cutmix=0.0", "model.drop_path_rate=0.0", "engine.ema_decay=null"]
_ADD = {"+smoothing": ["data.label_smoothing=0.1"], "+randaugment": ["data.auto_augment=rand-m9-mstd0.5-inc1"],
        "+erasing": ["data.re_prob=0.25"],
        "+mix": ["data.mixup=0.8", "data.cutmix=1.0", "model.drop_path_rate=0.1"]}


def _ladder() -> dict[str, list[str]]:
    levels, args = {"light": list(_LIGHT)}, list(_LIGHT)
    for name, more in _ADD.items():
        args = args + more  # later overrides win: each level is the one below plus its component
        levels[name] = args
    return levels


def no_plateau_stop() -> list[str]:
    """The ladder's runs last exactly E passes: no plateau stop, where this vitkit has one."""
    from vitkit.config import TrainConfig

    return ["engine.plateau_patience=null"] if hasattr(TrainConfig().engine, "plateau_patience") else []


LADDER = _ladder()
LEVELS = tuple(LADDER)
LADDER_EPOCHS = {"cifar10-2class": (15, 30, 60, 120), "fashion-lt": (15, 30, 60)}
PARTS = ("ladder", "models", "balance")
# The imbalance remedies on the long-tailed row, each a no-flag run at the plan's own budget for it.
BALANCE_ROWS, BALANCE_CHOICES, BALANCE_BUDGET = ("fashion-lt",), ("none", "sampler", "loss"), "10m"
MODEL_BUDGETS = {"cifar10-2class": ("1m", "3m", "9m"), "fashion-lt": ("3m", "9m")}

# --smoke: a 300-image long-tailed Fashion-MNIST, two levels at one pass, both candidates, 3 steps a run
SMOKE_ROOT = Path("/tmp/plan-sweep-smoke")
SMOKE_LEVELS = ("light", "+mix")
SMOKE_EPOCHS, SMOKE_BUDGET = (1,), ("20s",)


# ---- derivations ------------------------------------------------------------------------------------


def _tol(a: dict, b: dict) -> float:
    return math.hypot(a.get("se") or 0.0, b.get("se") or 0.0)


def _index(cells: list[dict], key: str) -> dict[str, dict]:
    """``{row: {key value: {level or model: cell}}}`` of the cells with a score."""
    out: dict = {}
    for c in cells:
        if c.get("score") is not None:
            out.setdefault(c["row"], {}).setdefault(c[key], {})[c.get("level") or c.get("model") or c.get("balance")] = c
    return out


def derive_light_epochs(ladder: list[dict]) -> dict:
    """Per row, the largest passes up to which ``light`` is within ``tol`` of the best level; the smallest over rows."""
    per_row = {}
    for row, by_e in _index(ladder, "epochs_set").items():
        holds = None
        for e in sorted(by_e):
            at = by_e[e]
            others = [c for level, c in at.items() if level != LEVELS[0]]
            if LEVELS[0] not in at or not others:
                break
            best = max(others, key=lambda c: c["score"])
            if at[LEVELS[0]]["score"] < best["score"] - _tol(at[LEVELS[0]], best):
                break
            holds = e
        per_row[row] = holds
    values = list(per_row.values())
    return {"per_row": per_row, "estimate": None if not values or None in values else min(values),
            "current": LIGHT_EPOCHS}


def derive_steps(ladder: list[dict]) -> dict:
    """Per component: per row the smallest passes at which it gains more than ``tol`` over the level below,
    the largest of those over the rows, and the plan's strength there."""
    index = _index(ladder, "epochs_set")
    out = {}
    for below, level in zip(LEVELS, LEVELS[1:]):
        per_row, gains = {}, {}
        for row, by_e in index.items():
            per_row[row] = None
            gains[row] = {}
            for e in sorted(by_e):
                a, b = by_e[e].get(below), by_e[e].get(level)
                if a is None or b is None:
                    continue
                gains[row][str(e)] = b["score"] - a["score"]
                if per_row[row] is None and b["score"] - a["score"] > _tol(a, b):
                    per_row[row] = e
        values = list(per_row.values())
        epochs = None if not values or None in values else max(values)
        out[level] = {"per_row": per_row, "epochs": epochs,
                      "strength": None if epochs is None else round(aug_strength(epochs), 3), "gain": gains}
    return out


def derive_min_epochs(models: list[dict]) -> dict:
    """Per row, the fewest passes of the larger candidate at which it scores at least as well as the faster
    one under the same budget; the largest over the rows."""
    per_row, lost_up_to = {}, {}
    for row, by_budget in _index(models, "budget_s").items():
        per_row[row] = lost_up_to[row] = None
        for budget in sorted(by_budget):
            faster, larger = by_budget[budget].get("faster"), by_budget[budget].get("larger")
            if faster is None or larger is None:
                continue
            if larger["score"] >= faster["score"]:
                per_row[row] = larger["epochs"]
                break
            if larger["score"] < faster["score"] - _tol(larger, faster):
                lost_up_to[row] = max(lost_up_to[row] or 0.0, larger["epochs"])
    values = list(per_row.values())
    return {"per_row": per_row, "estimate": None if not values or None in values else max(values),
            "lost_beyond_tol_up_to": lost_up_to, "current": MIN_EPOCHS}


def derive_balance(cells: list[dict]) -> dict:
    """Per row, the remedy with the best score, and whether it beats no remedy by more than ``tol``."""
    out = {}
    for row, by in _index(cells, "budget_s").items():
        for at in by.values():
            best = max(at.values(), key=lambda c: c["score"])
            none = at.get("none")
            out[row] = {"scores": {k: c["score"] for k, c in at.items()}, "best": best["balance"],
                        "beats_none": None if none is None or best is none else
                        best["score"] - none["score"] > _tol(best, none)}
    return out


# ---- the runs ---------------------------------------------------------------------------------------


def cell(root: Path, name: str, data: str, args: list[str], metric: str, reuse: bool, **about) -> dict:
    """One training process; its score, error and passes, with ``about`` (row, level, ...)."""
    entry = dict(about, run=name)
    try:
        res = stage(root, name, data, args, reuse)
    except SystemExit as e:  # a failed cell is recorded and left out of the derivations
        entry.update(score=None, error=str(e)[-500:])
        return entry
    score, se = score_se(res["summary"], metric)
    entry.update(score=score, se=se, epochs=res["summary"].get("epochs"), wall_s=res["wall_s"],
                 model_name=res["summary"].get("model"), run_dir=res["run_dir"])
    print(f"{name}: {metric} {score}", flush=True)
    return entry


def sweep(rows: dict[str, str], root: Path, reuse: bool, levels, epochs: dict, budgets: dict,
          extra: list[str], parts: tuple[str, ...] = PARTS,
          balance_budget: str = BALANCE_BUDGET) -> tuple[list[dict], list[dict], list[dict]]:
    """The ladder, model and balance cells for ``rows`` (``{row: data path}``), of the ``parts`` asked for."""
    ladder, models, balance = [], [], []
    for row, data in rows.items():
        metric = ROWS[row].metric
        (root / row).mkdir(parents=True, exist_ok=True)
        for e in epochs[row] if "ladder" in parts else ():
            for level in levels:
                args = [f"engine.epochs={e}", f"engine.eval_every={e}", *no_plateau_stop(), *FASTER, *LADDER[level],
                        *extra]
                ladder.append(cell(root, f"{row}/ladder-e{e}-{level}", data, args, metric, reuse, row=row,
                                   level=level, epochs_set=e))
        for budget in budgets[row] if "models" in parts else ():
            for model, model_args in MODELS.items():
                args = [f"engine.time_budget={budget}", *model_args, *extra]
                models.append(cell(root, f"{row}/models-{budget}-{model}", data, args, metric, reuse, row=row,
                                   model=model, budget_s=parse_duration(budget)))
        for choice in BALANCE_CHOICES if "balance" in parts and row in BALANCE_ROWS else ():
            args = [f"engine.time_budget={balance_budget}", f"data.balance={choice}", *extra]
            balance.append(cell(root, f"{row}/balance-{choice}", data, args, metric, reuse, row=row,
                                balance=choice, budget_s=parse_duration(balance_budget)))
    return ladder, models, balance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", choices=SWEEP_ROWS, default=list(SWEEP_ROWS))
    ap.add_argument("--run-root", default=None,
                    help="where the runs go; finished cells there are reused (default: runs/plan-sweep-<time>)")
    ap.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS),
                    help="run only these parts (a later run with the same --run-root reuses finished cells)")
    ap.add_argument("--smoke", action="store_true",
                    help="a 300-image long-tailed Fashion-MNIST, 2 levels, 3 steps a run; results under /tmp")
    args = ap.parse_args()
    t0, load_start = time.time(), os.getloadavg()
    if args.smoke:
        root = SMOKE_ROOT / "runs"
        shutil.rmtree(root, ignore_errors=True)
        data = longtail_idx(FASHION, SMOKE_ROOT / "data" / "fashion-lt-smoke", total=300, test_first=20)
        rows = {"fashion-lt": str(data)}
        levels, epochs, budgets = SMOKE_LEVELS, {"fashion-lt": SMOKE_EPOCHS}, {"fashion-lt": SMOKE_BUDGET}
        extra, out = [*SMOKE_ARGS, "data.batch_size=16"], str(SMOKE_ROOT / "plan_sweep_smoke.json")
    else:
        root = Path(args.run_root or REPO / "runs" / f"plan-sweep-{time.strftime('%Y%m%d-%H%M%S')}")
        rows = {row: row_data(row)[0] for row in args.rows}
        levels, epochs, budgets, extra, out = LEVELS, LADDER_EPOCHS, MODEL_BUDGETS, [], "plan_sweep.json"
    ladder, models, balance = sweep(rows, root, not args.smoke, levels, epochs, budgets, extra, tuple(args.parts),
                                    SMOKE_BUDGET[0] if args.smoke else BALANCE_BUDGET)
    payload = {
        "benchmark": "the plan's LIGHT_EPOCHS, augmentation steps and MIN_EPOCHS, re-derived from measurements",
        "derived": {"light_epochs": derive_light_epochs(ladder), "steps": derive_steps(ladder),
                    "min_epochs": derive_min_epochs(models), "balance": derive_balance(balance)},
        "constants_now": {"LIGHT_EPOCHS": LIGHT_EPOCHS, "STRONG_EPOCHS": STRONG_EPOCHS, "MIN_EPOCHS": MIN_EPOCHS},
        "grid": {"ladder": LADDER, "ladder_epochs": epochs, "ladder_model": FASTER, "models": MODELS,
                 "model_budgets": budgets, "rows": {r: ROWS[r].about for r in rows}, "data": rows},
        "ladder": ladder, "models": models, "balance": balance,
        **run_facts(args.smoke, root, t0, load_start),
    }
    print("wrote", write_json(out, payload))


if __name__ == "__main__":
    main()
