"""Run directories: never mix two runs in one folder, never re-stretch a schedule by accident.

An ``--out`` folder that already holds a run (``config.yaml`` or ``checkpoints/``) is either
continued (``resume``) or started over (``force``: the previous run's files are deleted, so
metrics of two runs never share one ``metrics.jsonl``). On resume, changing a key that shapes
the learning-rate schedule would move the lr abruptly at the resumed step, so such changes
need an explicit ``reschedule``: the schedule is then re-stretched from the current step.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import ConfigError, RunDirError

# Everything a vitkit run writes into its directory; --force removes exactly these.
RUN_FILES = (
    "config.yaml", "run.json", "summary.json", "metrics.jsonl", "model.safetensors", "bad_files.txt",
    "error.log", "checkpoints", "tb", "plots",
)
# Keys whose change alters the lr at a given step (the schedule's length or shape).
SCHEDULE_KEYS = (
    "engine.epochs", "engine.max_steps", "engine.time_budget", "data.batch_size",
    "engine.accum_steps", "optim.lr", "schedule.*",
)


def holds_run(out: str | Path) -> bool:
    out = Path(out)
    return (out / "config.yaml").is_file() or (out / "checkpoints").is_dir()


def prepare_out_dir(out: str | Path, *, resume: bool | str = False, force: bool = False,
                    is_main: bool = True) -> list[str]:
    """Check that ``out`` may receive this run (nothing is created yet); returns the names ``force`` removed.

    Raises:
        RunDirError: ``out`` holds a run and neither ``resume`` nor ``force`` is given, or it
            cannot be created or written.
    """
    out = Path(out)
    removed: list[str] = []
    if holds_run(out) and not resume:
        if not force:
            raise RunDirError(
                f"{out} already holds a run (config.yaml or checkpoints/): pass --resume to continue it, "
                "--force to delete its files and start over, or another --out"
            )
        if is_main:
            for name in RUN_FILES:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
                else:
                    continue
                removed.append(name)
    if is_main:
        _check_writable(out)
    return removed


def _check_writable(out: Path) -> None:
    """Raise RunDirError unless ``out`` exists and is writable, or can be created."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is a file, not a folder"
    elif existing == out:
        probe = out / ".vitkit_write_test"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            problem = e.strerror or str(e)
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"no permission to create folders in {existing}"
    if problem:
        raise RunDirError(
            f"cannot write the run directory {out}: {problem}. Choose another --out (engine.out_dir) "
            "or fix the permissions"
        )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _shapes_schedule(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in SCHEDULE_KEYS)


def schedule_changes(saved: dict, new: dict) -> list[str]:
    """``"key: old -> new"`` for every schedule-shaping key that differs between two config dicts."""
    a, b = _flatten(saved), _flatten(new)
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if _shapes_schedule(k) and a.get(k) != b.get(k)
    ]


def saved_config(resume: bool | str, out: str | Path) -> Path | None:
    """The ``config.yaml`` of the run that ``resume`` continues (``True``: the one in ``out``), if any."""
    if not resume:
        return None
    base = Path(out) if resume is True else Path(resume)
    if base.parent.name == "checkpoints":  # a checkpoint directory: its run is two levels up
        base = base.parent.parent
    path = base / "config.yaml"
    return path if path.is_file() else None


def check_resume_config(saved: dict, new: dict, *, reschedule: bool = False) -> list[str]:
    """Refuse schedule changes on resume unless ``reschedule``; returns the changes.

    Raises:
        ConfigError: a key of :data:`SCHEDULE_KEYS` differs and ``reschedule`` is False.
    """
    changes = schedule_changes(saved, new)
    if changes and not reschedule:
        raise ConfigError(
            "resuming with a different schedule would move the learning rate abruptly at the resumed step: "
            + "; ".join(changes)
            + ". Pass --reschedule to re-stretch the schedule from the current step, or drop these overrides"
        )
    return changes
