"""Run directories: the one place that knows their layout, and the rules for reusing one.

:class:`RunDir` names every file a run writes and reads them back::

    config.yaml            the resolved config (the base of --resume)
    run.json               model, classes, preprocessing, split counts, references
    summary.json           final and best metrics (written once, at the end)
    metrics.jsonl          one record per log step and evaluation
    model.safetensors      the final weights with their config (save_weights)
    bad_files.txt          broken images left out, one per line
    error.log              the traceback of a crash
    tb/  plots/            TensorBoard events, PNG plots
    samples/               a generative run's sample grid of each evaluation (step_N.png)
    checkpoints/
      step_000123/         model.safetensors, objective.safetensors, ema.safetensors, trainer_state.pt
      latest               names the newest complete step directory
      best/                a copy of the checkpoint with the best validation metric

Never mix two runs in one folder, never re-stretch a schedule by accident: an ``--out``
folder that already holds a run (``config.yaml`` or ``checkpoints/``) is either continued
(``resume``) or started over (``force``: the previous run's files are deleted, so metrics of
two runs never share one ``metrics.jsonl``). On resume, changing a key that shapes
the learning-rate schedule would move the lr abruptly at the resumed step, so such changes
need an explicit ``reschedule``: the schedule is then re-stretched from the current step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .errors import ConfigError, PathNotFoundError, RunDirError

CONFIG = "config.yaml"
RUN_INFO = "run.json"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
BAD_FILES = "bad_files.txt"
ERROR_LOG = "error.log"
TENSORBOARD = "tb"
PLOTS = "plots"
SAMPLES = "samples"
CACHE = "cache"  # the decode-once store's file, keyed by the data's fingerprint
CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
# Written last into a step directory: its presence marks the checkpoint complete.
STATE_FILE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step_(\d+)$")

# Everything a vitkit run writes into its directory; --force removes exactly these.
ADAPTER = "adapter.safetensors"  # a PEFT run's method and head weights alone
RUN_FILES = (CONFIG, RUN_INFO, SUMMARY, METRICS, WEIGHTS, ADAPTER, BAD_FILES, ERROR_LOG, CHECKPOINTS, TENSORBOARD,
             PLOTS, SAMPLES, CACHE)
# Keys whose change alters the lr at a given step (the schedule's length or shape).
SCHEDULE_KEYS = (
    "engine.epochs", "engine.max_steps", "engine.time_budget", "data.batch_size",
    "engine.accum_steps", "optim.lr", "schedule.*",
)


def step_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete ``step_N`` checkpoints under a ``checkpoints`` directory, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` points to under a ``checkpoints`` directory, else the newest complete one."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / STATE_FILE).is_file():
            return cand
    found = step_checkpoints(root)
    return found[-1] if found else None


class RunDir:
    """The files of one run directory, by role; nothing is created until something is written.

    >>> run = RunDir("runs/my-run")
    >>> run.final_weights, run.checkpoint("best"), run.read_config()["engine"]["epochs"]
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config_file = property(lambda self: self.path / CONFIG)
    run_json = property(lambda self: self.path / RUN_INFO)
    summary_json = property(lambda self: self.path / SUMMARY)
    metrics = property(lambda self: self.path / METRICS)
    final_weights = property(lambda self: self.path / WEIGHTS)
    bad_files = property(lambda self: self.path / BAD_FILES)
    error_log = property(lambda self: self.path / ERROR_LOG)
    tensorboard = property(lambda self: self.path / TENSORBOARD)
    plots = property(lambda self: self.path / PLOTS)
    samples = property(lambda self: self.path / SAMPLES)
    cache = property(lambda self: self.path / CACHE)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)

    @classmethod
    def of_checkpoint(cls, path: str | os.PathLike) -> RunDir | None:
        """The run a checkpoint directory or weights file belongs to (up to three levels up), or None."""
        for cand in list(Path(path).expanduser().parents)[:3]:
            if (cand / RUN_INFO).is_file():
                return cls(cand)
        return None

    @staticmethod
    def is_checkpoint(path: str | os.PathLike) -> bool:
        """Whether ``path`` is a complete checkpoint directory (``step_N/`` or ``best/``)."""
        return (Path(path) / STATE_FILE).is_file()

    def is_run(self) -> bool:
        """A run was started here: ``run.json`` is written before the first step."""
        return self.run_json.is_file()

    def holds_run(self) -> bool:
        """Something a new run would mix with is here: a config or checkpoints."""
        return self.config_file.is_file() or self.checkpoints.is_dir()

    def has_config(self) -> bool:
        return self.config_file.is_file()

    def read_config(self) -> dict:
        """The run's resolved ``config.yaml`` as a plain dict (empty when there is none)."""
        if not self.config_file.is_file():
            return {}
        import yaml

        return yaml.safe_load(self.config_file.read_text()) or {}

    def read_run_info(self) -> dict:
        """``run.json``: the model, its arguments, classes and preprocessing."""
        try:
            return json.loads(self.run_json.read_text())
        except FileNotFoundError:
            raise RunDirError(f"{self.path} is not a vitkit run directory: it has no {RUN_INFO}") from None
        except json.JSONDecodeError as e:
            raise RunDirError(f"{self.run_json} is not valid JSON ({e}); the run directory is damaged") from None

    def read_summary(self) -> dict:
        """``summary.json``, or {} while the run has not finished."""
        return json.loads(self.summary_json.read_text()) if self.summary_json.is_file() else {}

    def write_run_info(self, run_info: dict) -> None:
        """Write ``run.json`` and, when the scan found broken images, ``bad_files.txt``."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.run_json.write_text(json.dumps(run_info, indent=2) + "\n")
        if run_info.get("bad_files"):
            self.write_bad_files(run_info["bad_files"])

    def write_bad_files(self, lines: list[str]) -> None:
        self.bad_files.write_text("\n".join(lines) + "\n")

    def list_checkpoints(self) -> list[Path]:
        """Complete step checkpoints, oldest first."""
        return step_checkpoints(self.checkpoints)

    def checkpoint(self, which: str | int = LATEST) -> Path | None:
        """A complete checkpoint directory: ``"latest"``, ``"best"`` or a step number; None if absent."""
        if which == BEST:
            best = self.checkpoints / BEST
            return best if best.is_dir() else None
        if which == LATEST:
            return latest_checkpoint(self.checkpoints)
        if isinstance(which, int) or str(which).isdigit():
            return next((p for p in self.list_checkpoints() if int(p.name[len("step_"):]) == int(which)), None)
        raise ConfigError(f"checkpoint {which!r}: expected 'latest', 'best' or a step number")

    @staticmethod
    def checkpoint_weights(ckpt: str | os.PathLike, ema: bool = False) -> Path:
        """The model (or EMA) weights file of a checkpoint directory.

        Raises:
            RunDirError: ``ema`` and the run kept no EMA weights.
            PathNotFoundError: the checkpoint has no model weights.
        """
        ckpt = Path(ckpt)
        name = EMA_WEIGHTS if ema else WEIGHTS
        if not (ckpt / name).is_file():
            if ema:
                raise RunDirError(f"{ckpt} has no EMA weights: the run was trained without engine.ema_decay")
            raise PathNotFoundError(f"checkpoint {ckpt} has no {name}")
        return ckpt / name

    def weights(self, ema: bool = False) -> Path:
        """The weights a run stands for: its final ``model.safetensors``; for a run that did not
        finish, its ``best/`` checkpoint's, else its latest checkpoint's. ``ema``: the EMA weights
        of the latest checkpoint (of ``best/`` while the run is unfinished).

        Raises:
            RunDirError: the run has no weights yet, or no EMA weights.
        """
        finished = self.final_weights.is_file()
        if finished and not ema:
            return self.final_weights
        # A finished run's final weights are its latest checkpoint's; an unfinished run's best are in best/.
        ckpt = self.checkpoint(LATEST if finished else BEST) or self.checkpoint(LATEST)
        if ckpt is None:
            raise RunDirError(
                f"run {self.path} has no {WEIGHTS} and no checkpoint yet: train it (vitkit train --resume --out {self.path})"
            )
        return self.checkpoint_weights(ckpt, ema)


def prepare_out_dir(out: str | Path, *, resume: bool | str = False, force: bool = False,
                    is_main: bool = True) -> list[str]:
    """Check that ``out`` may receive this run (nothing is created yet); returns the names ``force`` removed.

    Raises:
        RunDirError: ``out`` holds a run and neither ``resume`` nor ``force`` is given, or it
            cannot be created or written.
    """
    out = Path(out)
    removed: list[str] = []
    if RunDir(out).holds_run() and not resume:
        if not force:
            raise RunDirError(
                f"{out} already holds a run ({CONFIG} or {CHECKPOINTS}/): pass --resume to continue it, "
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
    if base.parent.name == CHECKPOINTS:  # a checkpoint directory: its run is two levels up
        base = base.parent.parent
    path = RunDir(base).config_file
    return path if path.is_file() else None


def check_resume_config(saved: dict, new: dict, *, reschedule: bool = False) -> list[str]:
    """Refuse schedule changes on resume unless ``reschedule``; returns the changes.

    Raises:
        ConfigError: a key of :data:`SCHEDULE_KEYS` differs and ``reschedule`` is False.
    """
    was, now = _flatten(saved.get("peft") or {}), _flatten(new.get("peft") or {})
    peft = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    if peft:
        raise ConfigError(
            f"resuming with other peft.* settings ({', '.join('peft.' + k for k in peft)}) would not fit the "
            "checkpoint's trainable weights: resume with the run's own peft settings, or start a new run with --out"
        )
    changes = schedule_changes(saved, new)
    if changes and not reschedule:
        raise ConfigError(
            "resuming with a different schedule would move the learning rate abruptly at the resumed step: "
            + "; ".join(changes)
            + ". Pass --reschedule to re-stretch the schedule from the current step, or drop these overrides"
        )
    return changes


def resolve_weights(source: str | os.PathLike, use_ema: bool = False,
                    what: str | None = None) -> tuple[Path, RunDir | None]:
    """An existing file or folder -> (the weights file or folder to read, the run it belongs to).

    ``what`` names the source in the messages (e.g. ``objective.tokenizer=runs/tok``; default the path).

    Raises:
        PathNotFoundError: ``source`` does not exist.
        ConfigError: ``use_ema`` with a single weights file.
        RunDirError: a run without weights yet, a folder that is none of the above.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise PathNotFoundError(
            f"no such file or folder: {what or source}: pass a vitkit run directory or a .safetensors weights file"
        )
    if path.is_file():
        if use_ema:
            raise ConfigError(f"EMA weights live in a run's checkpoints; {path} is a single weights file")
        return path, RunDir.of_checkpoint(path)
    run = RunDir(path)
    if run.is_run():
        return run.weights(ema=use_ema), run
    if RunDir.is_checkpoint(path):
        return RunDir.checkpoint_weights(path, use_ema), RunDir.of_checkpoint(path)
    if (path / WEIGHTS).is_file() and not use_ema:
        return path / WEIGHTS, None
    raise RunDirError(
        (f"{what}: " if what else "") + f"{path} is not a vitkit run directory (no run.json), a checkpoint "
        f"directory (no {STATE_FILE}) or a folder with {WEIGHTS}"
    )
