"""CIFAR-10 from scratch under a fixed wall-clock budget: test accuracy, img/s and time.

Trains a shipped recipe (default ``cifar10_fast``) on the CIFAR-10 JPEG tar in
``../shared/datasets`` (read in place, never copied) and evaluates on the official
10,000-image **test** split: the tar holds ``train/`` and ``test/`` folders, and vitkit's
``val`` split of such a tree is its ``test/`` folder, so ``val_acc`` of the run summary is
test accuracy. Nothing is tuned on the test split during the run (it is evaluated once,
at the end).

Fitting the schedule to the budget: a cosine or one-cycle schedule only anneals if its
length is known up front. So the script first trains a few steps of the same run
(calibration, counted in the budget), measures seconds per optimizer step, and sets
``engine.max_steps`` to the steps that fit in what is left after an estimate of the final
evaluation; the schedule is sized to ``max_steps``. ``engine.time_budget_s`` is set as well,
so a slowdown (other load on the machine) still stops the run in time, evaluating and
writing the summary, at the cost of a schedule that did not quite finish. The whole
wall-clock time, calibration and evaluation included, is reported as ``wall_s``.

    python benchmarks/cifar10.py                       # 30 min, cifar10_fast
    python benchmarks/cifar10.py --budget-min 3 --out cifar10_3min.json
    python benchmarks/cifar10.py --recipe deit_tiny_cifar10 --set optim.lr=1e-3
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import vitkit
from vitkit.config import load_config, recipe_path, to_dict
from vitkit.train import build_run, train

from _common import machine, versions, write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
QUIET = ["engine.tensorboard=false", "engine.plots=false"]


class _StepClock:
    """Hook: perf_counter at every optimizer step, to time steps after a warm-up."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, trainer, step, metrics) -> None:
        self.times.append(time.perf_counter())


def calibrate(recipe: str, overrides: list[str], steps: int, warmup: int) -> tuple[float, int, int]:
    """(seconds per optimizer step, steps per epoch, test images) from a short run of the same recipe."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(recipe, [*overrides, *QUIET, f"engine.max_steps={steps + warmup}", f"engine.out_dir={tmp}"])
        trainer, info = build_run(cfg, verbose=False)
        trainer.val_loader = None  # timing only; the real run evaluates
        clock = _StepClock()
        trainer.hooks.append(clock)
        trainer.fit()
    sec_per_step = (clock.times[-1] - clock.times[warmup - 1]) / steps
    return sec_per_step, trainer.steps_per_epoch, info["n_val"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-min", type=float, default=30.0, help="wall-clock budget in minutes (all included)")
    ap.add_argument("--recipe", default="cifar10_fast")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 JPEG tar (train/ and test/ class folders)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    ap.add_argument("--calib-steps", type=int, default=40, help="timed calibration steps (after 5 warm-up steps)")
    ap.add_argument("--run-dir", default=None, help="run directory (default runs/cifar10-<recipe>-<time>)")
    ap.add_argument("--out", default="cifar10.json")
    args = ap.parse_args()

    t0 = time.time()
    budget_s = args.budget_min * 60
    load_start = os.getloadavg()
    run_dir = args.run_dir or str(REPO / "runs" / f"cifar10-{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
    overrides = [f"data.path={args.data}", *args.set]

    sec_per_step, steps_per_epoch, n_test = calibrate(args.recipe, overrides, args.calib_steps, warmup=5)
    cfg = load_config(args.recipe, overrides)
    # Forward-only evaluation runs at roughly 3x the training rate; count it as 2x, to be safe.
    eval_s = n_test / (2 * cfg.data.batch_size / sec_per_step)
    left_s = budget_s - (time.time() - t0)
    # 3% margin for epoch boundaries (loader restart, checkpoint writes).
    steps = max(1, int(0.97 * (left_s - eval_s) / sec_per_step))
    epochs = math.ceil(steps / steps_per_epoch)
    print(f"calibration: {sec_per_step * 1000:.0f} ms/step ({cfg.data.batch_size / sec_per_step:.0f} img/s), "
          f"{left_s:.0f} s left -> {steps} steps = {steps / steps_per_epoch:.2f} epochs", flush=True)

    final = [
        *overrides, *QUIET, f"engine.out_dir={run_dir}", f"engine.epochs={epochs}", f"engine.max_steps={steps}",
        f"engine.eval_every={epochs}", f"engine.time_budget_s={left_s - eval_s:.0f}",
    ]
    run_cfg = load_config(args.recipe, final)
    summary = train(run_cfg)
    wall_s = time.time() - t0
    if summary["val_acc"] is None:
        raise SystemExit("the run produced no test accuracy")

    payload = {
        "benchmark": f"CIFAR-10 from scratch, {args.budget_min:g} min wall-clock budget, official test split",
        "recipe": args.recipe,
        "recipe_yaml": recipe_path(args.recipe).read_text(),
        "overrides": final,
        "resolved_config": to_dict(run_cfg),
        "model": summary["model"],
        "test_acc": summary["val_acc"],
        "best_test_acc": summary["best_val_acc"],
        "test_loss": summary["val_loss"],
        "test_split": f"cifar10/test/ of {Path(args.data).name}: {n_test} images, evaluated once at the end",
        "train_img_per_s": summary["train_img_per_s"],
        "calibration_img_per_s": cfg.data.batch_size / sec_per_step,
        "epochs": summary["epochs"],
        "steps": summary["steps"],
        "planned_steps": steps,
        "stopped": summary["stopped"],
        "budget_s": budget_s,
        "wall_s": wall_s,
        "train_time_s": summary["train_time_s"],
        "amp": summary["amp"],
        "run_dir": run_dir,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "machine": machine(),
        "versions": versions(vitkit),
    }
    print(f"test acc {payload['test_acc']:.4f} after {payload['epochs']:.2f} epochs, "
          f"{payload['train_img_per_s']:.0f} img/s, {wall_s / 60:.1f} min", flush=True)
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
