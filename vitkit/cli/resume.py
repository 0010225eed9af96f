"""What ``--resume`` continues: shared by ``vitkit train`` and ``vitkit pretrain``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError, PathNotFoundError, RunDirError
from ..rundir import CHECKPOINTS, RunDir


def resume_plan(args: argparse.Namespace) -> tuple[RunDir | None, bool | str, str | None]:
    """(run whose config.yaml is the base, ``resume`` for train(), out dir override) from ``--resume``/``--out``.

    ``args.overrides`` gains an override that argparse took as ``--resume``'s value.
    """
    if args.resume is None:
        return None, False, args.out
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        # argparse gives `--resume engine.epochs=2` the override as --resume's value.
        args.overrides.insert(0, args.resume)
        args.resume = True
    if args.resume is True:
        if not args.out:
            raise ConfigError("--resume without a checkpoint continues the run in --out: pass --out RUN_DIR, "
                              "or --resume CHECKPOINT_OR_RUN_DIR")
        if not RunDir(args.out).has_config():
            # Nothing to continue yet: start the run, so one command line serves every restart of a job.
            return None, True, args.out
        return RunDir(args.out), True, args.out
    path = Path(args.resume)
    if not path.is_dir():
        raise PathNotFoundError(f"--resume {path}: no such checkpoint or run directory")
    if RunDir(path).has_config():  # a run directory: continue from its latest checkpoint
        if args.out and Path(args.out).resolve() != path.resolve():
            return RunDir(path), str(path), args.out
        return RunDir(path), True, str(path)
    run = RunDir(path.parent.parent) if path.parent.name == CHECKPOINTS else None
    if run is None or not run.has_config():
        raise RunDirError(f"--resume {path}: expected a run directory (with config.yaml) or one of its "
                          "checkpoints/step_N directories")
    return run, str(path), args.out or str(run.path)
