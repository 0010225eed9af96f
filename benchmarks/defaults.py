"""No-flag defaults against a hand-set recipe, under the same wall-clock budget.

For each dataset, ``vitkit train --data PATH --out DIR`` runs with no other arguments in a fresh
process (imports, scan, calibration and evaluation all count): on the built-in shapes data that
is the ``shapes_quick`` recipe, elsewhere the data-aware plan, which picks its own budget on a
CPU. Then the best hand-set recipe for that dataset runs under the same budget (the plan's
``engine.time_budget``, or the no-flag run's wall time where it had none). Accuracy is on the
test split: Fashion-MNIST's ``t10k`` files and CIFAR-10's ``test/`` folder are what vitkit
evaluates as ``val`` for those layouts (evaluated at the end of the run; nothing is tuned on
it); the shapes data has no test split, so its held-out val split stands in.

Writes results/defaults.json: ``{"rows": [{dataset, acc_default, acc_handset, ratio, wall_s,
budget_s}, ...]}`` plus the machine and versions.

    python benchmarks/defaults.py                                # the full benchmark (~1 h on 2 cores)
    python benchmarks/defaults.py --budget 60s --datasets shapes fashion-mnist --out defaults_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vitkit
from vitkit.engine.budget import parse_duration

from _common import machine, versions, write_json

REPO = Path(__file__).resolve().parents[1]
# ../shared/datasets beside the checkout (or beside a worktree's parent folder)
SHARED = next((p / "shared" / "datasets" for p in REPO.parents if (p / "shared" / "datasets").is_dir()),
              REPO.parent / "shared" / "datasets")
DATASETS = {
    "shapes": "shapes",
    "fashion-mnist": str(SHARED / "fashion-mnist"),
    "cifar10": str(SHARED / "cifar10-jpg.tar.gz"),
}
QUIET = ["engine.tensorboard=false", "engine.plots=false"]
# The best hand-set recipe per dataset: a shipped recipe plus overrides (all measured by hand).
# On shapes the no-flag run already uses the hand-tuned shapes_quick recipe, so that one run is
# both columns (recorded as such in the row) instead of the same command twice.
HANDSET = {
    "shapes": None,
    "fashion-mnist": ("cifar10_fast", []),
    "cifar10": ("cifar10_fast", []),
}


def _cli() -> list[str]:
    exe = shutil.which("vitkit")
    return [exe] if exe else [sys.executable, "-m", "vitkit.cli.main"]


def _run(args: list[str], log: Path) -> float:
    """Run ``vitkit train ARGS`` in a fresh process; returns its wall-clock seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run([*_cli(), "train", *args], check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def bench(name: str, path: str, budget: str | None, work: Path) -> dict:
    d_run, h_run = work / f"{name}-default", work / f"{name}-handset"
    extra = [f"engine.time_budget={budget}"] if budget else []  # smoke runs only: the real one passes nothing
    wall_default = _run(["--data", path, "--out", str(d_run), *extra], work / f"{name}-default.log")
    s_default = _summary(d_run)
    planned = json.loads((d_run / "run.json").read_text()).get("plan") or {}
    cfg_budget = (planned.get("engine.time_budget") or {}).get("value") or budget
    budget_s = parse_duration(cfg_budget) if cfg_budget else wall_default
    if HANDSET[name] is None:
        recipe, overrides, wall_handset, s_handset = "the no-flag run's own recipe", [], wall_default, s_default
    else:
        recipe, overrides = HANDSET[name]
        wall_handset = _run(
            ["--recipe", recipe, "--data", path, "--out", str(h_run), *QUIET, *overrides,
             f"engine.time_budget={budget_s:.0f}"],
            work / f"{name}-handset.log",
        )
        s_handset = _summary(h_run)
    acc_d, acc_h = s_default["val_acc"], s_handset["val_acc"]
    row = {
        "dataset": name, "acc_default": acc_d, "acc_handset": acc_h,
        "ratio": acc_d / acc_h if acc_h else None, "wall_s": wall_default, "budget_s": budget_s,
        "wall_handset_s": wall_handset, "model_default": s_default["model"], "model_handset": s_handset["model"],
        "epochs_default": s_default["epochs"], "epochs_handset": s_handset["epochs"],
        "handset": {"recipe": recipe, "overrides": overrides}, "plan": planned,
    }
    print(f"{name}: default {acc_d:.4f} in {wall_default:.0f} s, hand-set {acc_h:.4f} in {wall_handset:.0f} s "
          f"(budget {budget_s:.0f} s)", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--budget", default=None,
                    help="smoke test only: give the no-flag run this engine.time_budget (e.g. 60s)")
    ap.add_argument("--out", default="defaults.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vitkit-defaults-"))
    load_start = os.getloadavg()
    rows = [bench(name, DATASETS[name], args.budget, work) for name in args.datasets]
    payload = {
        "benchmark": "`vitkit train --data PATH` with no other arguments vs the best hand-set recipe, same budget",
        "rows": rows,
        "budget_override": args.budget,
        "work_dir": str(work),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "machine": machine(),
        "versions": versions(vitkit),
    }
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
