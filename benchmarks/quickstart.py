"""The README's main command, timed: `vitkit train` with no arguments on a fresh process.

Runs the console script in a subprocess (so imports and data inspection count), then reads
the run's summary.json. Writes results/quickstart.json with the wall-clock time, validation
accuracy and throughput. There is no peer here: the claim is ">= 90% in under 3 minutes".

    python benchmarks/quickstart.py
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

from _common import machine, versions, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="quickstart.json")
    args = ap.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="vitkit-quickstart-"))
    cli = shutil.which("vitkit") or f"{sys.executable} -m vitkit.cli.main"
    cmd = [*cli.split(), "train", "--out", str(run_dir)]
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    payload = {
        "benchmark": "`vitkit train` (no arguments: built-in shapes data, auto recipe), process wall-clock",
        "command": "vitkit train",
        "wall_s": round(wall, 1),
        "val_acc": summary["val_acc"],
        "best_val_acc": summary["best_val_acc"],
        "epochs": summary["epochs"],
        "steps": summary["steps"],
        "train_img_per_s": round(summary["train_img_per_s"], 1),
        "model": summary.get("model"),
        "target": {"val_acc": 0.9, "wall_s": 180},
        "met": summary["val_acc"] >= 0.9 and wall < 180,
        "loadavg_start": list(load_start),
        "machine": machine(),
        "versions": versions(vitkit),
    }
    print(json.dumps({k: payload[k] for k in ("wall_s", "val_acc", "train_img_per_s", "met")}))
    print("wrote", write_json(args.out, payload))
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
