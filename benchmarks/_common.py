"""Shared helpers for benchmark scripts: machine facts, versions, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def versions(*modules) -> dict:
    out = {"torch": torch.__version__}
    for m in modules:
        if m is not None:
            out[m.__name__] = getattr(m, "__version__", "?")
    return out


def median_rate(fn, items_per_call: int, reps: int = 5, warmup: int = 2) -> tuple[float, list[float]]:
    """Median items/s of ``fn`` over ``reps`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        rates.append(items_per_call / (time.perf_counter() - t0))
    return statistics.median(rates), rates


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def cli_train(data: str, out: Path, args: list[str]) -> dict:
    """``vitkit train --data DATA --out OUT ARGS...`` as a user runs it; SystemExit with its output on failure.

    Returns ``{"wall_s", "summary", "run_info", "stdout_tail", "command"}`` (the run's summary.json and run.json).
    """
    cmd = [sys.executable, "-m", "vitkit.cli.main", "train", "--data", str(data), "--out", str(out), *args]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {
        "wall_s": wall, "summary": json.loads((out / "summary.json").read_text()),
        "run_info": json.loads((out / "run.json").read_text()), "stdout_tail": proc.stdout[-2000:],
        "command": " ".join(["vitkit", *cmd[3:]]),
    }
