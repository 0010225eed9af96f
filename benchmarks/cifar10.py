"""CIFAR-10 from scratch under a fixed wall-clock budget: test accuracy, img/s and time.

Trains a shipped recipe (default ``cifar10_fast``) on the CIFAR-10 JPEG tar in
``../shared/datasets`` (read in place, never copied) and evaluates on the official
10,000-image **test** split: the tar holds ``train/`` and ``test/`` folders, and vitkit's
``val`` split of such a tree is its ``test/`` folder, so ``val_acc`` of the run summary is
test accuracy. Nothing is tuned on the test split during the run (it is evaluated once,
at the end).

The run is budgeted by time: ``engine.time_budget`` bounds the whole command (data scan,
model build, training, final evaluation, checkpoint, summary); the one-cycle schedule follows
the elapsed share of the budget, so it anneals when the budget ends however the throughput
swings on a shared machine. The recipe is used as committed, with no other overrides.

    python benchmarks/cifar10.py                       # 30 min, cifar10_fast
    python benchmarks/cifar10.py --budget 3m --out cifar10_3min.json
    python benchmarks/cifar10.py --recipe deit_tiny_cifar10 --set optim.lr=1e-3
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import vitkit
from vitkit.config import load_config, recipe_path, to_dict
from vitkit.engine.budget import parse_duration
from vitkit.evaluate import evaluate
from vitkit.train import train

from _common import RESULTS, machine, versions, write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = next((p / "shared" / "datasets" for p in REPO.parents if (p / "shared" / "datasets").is_dir()),
              REPO.parent / "shared" / "datasets")
DEFAULT_DATA = SHARED / "cifar10-jpg.tar.gz"
QUIET = ["engine.tensorboard=false", "engine.plots=false"]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def history(path: Path, new: dict) -> list[dict]:
    """Earlier runs written to ``path`` (what was tried and what it gave), oldest first: each with
    the config keys in which it differed from the run after it."""
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    # Through JSON both sides, so that a tuple and the list it was saved as compare equal.
    now, then = (_flat(json.loads(json.dumps(c))) for c in (new["resolved_config"], old.get("resolved_config", {})))
    skip = ("engine.out_dir", "data.path")
    changed = {k: then.get(k) for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k) and k not in skip}
    entry = {k: old.get(k) for k in ("recipe", "test_acc", "epochs", "train_img_per_s", "wall_s", "budget_s")}
    entry.update(git_commit=old.get("machine", {}).get("git_commit"), differs_from_next_run=changed)
    return [*old.get("history", []), entry]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="30m", help="wall-clock budget for the whole run (30m, 90s, 1h)")
    ap.add_argument("--recipe", default="cifar10_fast")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 JPEG tar (train/ and test/ class folders)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    ap.add_argument("--run-dir", default=None, help="run directory (default runs/cifar10-<recipe>-<time>)")
    ap.add_argument("--out", default="cifar10.json")
    args = ap.parse_args()

    t0 = time.time()
    budget_s = parse_duration(args.budget)
    load_start = os.getloadavg()
    run_dir = args.run_dir or str(REPO / "runs" / f"cifar10-{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
    final = [f"data.path={args.data}", *args.set, *QUIET, f"engine.out_dir={run_dir}",
             f"engine.time_budget={args.budget}"]
    run_cfg = load_config(args.recipe, final)
    summary = train(run_cfg)
    wall_s = time.time() - t0
    if summary["val_acc"] is None:
        raise SystemExit("the run produced no test accuracy")
    n_test = json.loads((Path(run_dir) / "run.json").read_text())["n_val"]
    tta = (run_cfg.objective or {}).get("tta", "none")
    no_tta = None
    if tta != "none":  # for the record, outside the timed run: the same weights without it
        no_tta = evaluate(run_dir, args.data, tta="none", out_dir=Path(run_dir) / "eval_no_tta")["top1"]

    payload = {
        "benchmark": f"CIFAR-10 from scratch, {args.budget} wall-clock budget, official test split",
        "recipe": args.recipe,
        "recipe_yaml": recipe_path(args.recipe).read_text(),
        "overrides": final,
        "resolved_config": to_dict(run_cfg),
        "model": summary["model"],
        "test_acc": summary["val_acc"],
        "best_test_acc": summary["best_val_acc"],
        "test_loss": summary["val_loss"],
        "tta": tta,
        "test_acc_without_tta": no_tta,
        "test_split": f"cifar10/test/ of {Path(args.data).name}: {n_test} images, evaluated once at the end",
        "train_img_per_s": summary["train_img_per_s"],
        "epochs": summary["epochs"],
        "steps": summary["steps"],
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
    payload["history"] = history(RESULTS / args.out, payload)
    print(f"test acc {payload['test_acc']:.4f} after {payload['epochs']:.2f} epochs, "
          f"{payload['train_img_per_s']:.0f} img/s, {wall_s / 60:.1f} min", flush=True)
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
