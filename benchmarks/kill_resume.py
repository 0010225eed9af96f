"""Kill -9 at random moments of a training run, resume each time, compare with an uninterrupted run.

One small run (built-in shapes data, a tiny ViT, checkpoints every few steps) is trained once
without interruption. Then, for each of ``--kills`` trials, the same command is started in a
fresh run directory, killed with SIGKILL after a random delay (anywhere from start-up to the end
of training, so some kills land inside a checkpoint write), and restarted with the very same
command line until it exits 0, the way a job scheduler restarts a preempted job (a trial
whose run ended before its kill is redrawn, so every kill lands inside a run). The final
``model.safetensors`` must equal the uninterrupted run's bit for bit (CPU, fp32).

Writes results/kill_resume.json: ``{"kills", "resumed", "bitwise_equal", "trials": [...]}``.

    python benchmarks/kill_resume.py [--kills 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import vitkit

from _common import machine, versions, write_json

OVERRIDES = [
    "--data", "shapes:1536",
    "model.name=test_vit", "data.img_size=32", "data.batch_size=16", "data.num_workers=2",
    "engine.epochs=4", "engine.ckpt_every_steps=4", "engine.amp=none",
    "engine.tensorboard=false", "engine.plots=false", "engine.log_every=5",
]


def command(out: Path) -> list[str]:
    cli = shutil.which("vitkit")
    base = [cli] if cli else [sys.executable, "-m", "vitkit.cli.main"]
    return [*base, "train", "--resume", "--out", str(out), *OVERRIDES]


def run_to_end(out: Path, max_restarts: int = 5) -> tuple[int, list[int]]:
    """Restart the job until it exits 0; returns (restarts needed, exit codes seen)."""
    codes = []
    for _ in range(max_restarts):
        proc = subprocess.run(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        codes.append(proc.returncode)
        if proc.returncode == 0:
            return len(codes), codes
        print(proc.stderr[-2000:], file=sys.stderr)
    return len(codes), codes


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="kill_resume.json")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="vitkit-kill-"))

    ref = root / "reference"
    t0 = time.perf_counter()
    restarts, codes = run_to_end(ref)
    ref_wall = time.perf_counter() - t0
    if codes[-1] != 0:
        raise SystemExit(f"the uninterrupted run failed with exit codes {codes}")
    print(f"uninterrupted run: {ref_wall:.1f} s")

    trials = []
    for k in range(args.kills):
        out = root / f"trial{k}"
        # A kill must land inside the run: when the run ended first (a fast moment of a shared
        # machine), the trial starts over in a fresh directory with a new delay.
        attempts = 0
        while attempts < 5:
            attempts += 1
            shutil.rmtree(out, ignore_errors=True)
            delay = rng.uniform(0.5, ref_wall)
            proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay)
            finished_before_kill = proc.poll() is not None
            if not finished_before_kill:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            if not finished_before_kill:
                break
        ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []
        n_runs, codes = run_to_end(out)
        resumed = codes[-1] == 0
        equal = resumed and same_weights(ref / "model.safetensors", out / "model.safetensors")
        trials.append({
            "kill_after_s": round(delay, 2), "finished_before_kill": finished_before_kill, "attempts": attempts,
            "checkpoints_at_kill": ckpts, "restarts": n_runs, "exit_codes": codes,
            "resumed": resumed, "bitwise_equal": equal,
        })
        print(f"kill {k}: after {delay:.1f} s, checkpoints {ckpts}, resumed={resumed}, bitwise_equal={equal}")

    payload = {
        "benchmark": "SIGKILL at random moments of one CPU training run, restarted with the same command",
        "command": " ".join(["vitkit", "train", "--resume", "--out", "RUN", *OVERRIDES]),
        "kills": args.kills,
        "killed_mid_run": sum(not t["finished_before_kill"] for t in trials),
        "resumed": sum(t["resumed"] for t in trials),
        "bitwise_equal": sum(t["bitwise_equal"] for t in trials),
        "uninterrupted_wall_s": round(ref_wall, 1),
        "trials": trials,
        "machine": machine(),
        "versions": versions(vitkit),
    }
    print("wrote", write_json(args.out, payload))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
