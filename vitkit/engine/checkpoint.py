"""Checkpoint files on disk: atomic step directories, `latest`, `best/` (swap and recovery), RNG capture.

Layout of a run directory::

    checkpoints/
      step_000123/           one checkpoint: written as .tmp_step_000123 then renamed
        model.safetensors      objective.export_model()'s state dict (the run's product)
        objective.safetensors  objective state (EMA teacher, centers; not teachers kept by reference)
        ema.safetensors        EMA weights, when EMA is on
        trainer_state.pt       optimizer, scheduler, scaler, counters, RNG, sampler, config
      latest                 text file naming the newest complete checkpoint (atomic replace)
      best/                  copy of the checkpoint with the best validation metric

A write killed half-way leaves only a ``.tmp_*`` directory, which is ignored and cleaned up
by the next save; ``latest`` still names the previous complete checkpoint.
``trainer_state.pt`` holds only tensors and primitive containers so it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import PathNotFoundError, TrainingError
from ..rundir import BEST, CHECKPOINTS, LATEST, STATE_FILE, latest_checkpoint, step_checkpoints

WEIGHT_FILES = ("model", "objective", "ema")


class NonFiniteWeightsError(TrainingError):
    """Raised instead of writing a checkpoint whose weights contain NaN or inf."""


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable; not every platform can open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".tmp_{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing any previous one.

    A directory cannot be renamed over a non-empty one, so the previous one is first moved
    aside to ``.old_<name>`` (a leftover from a crash is removed) and deleted afterwards.
    """
    if final.exists():
        old = final.with_name(f".old_{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _plain_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors with no shared storage, as safetensors requires."""
    out, seen = {}, set()
    for k, v in sd.items():
        t = v.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        # Tied weights share storage; safetensors refuses that, so the second one is copied.
        if ptr in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        seen.add(ptr)
        out[k] = t
    return out


def _write_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    save_file(tensors, str(path))
    _fsync_file(path)


def check_finite(name: str, sd: dict[str, Tensor]) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first floating tensor with NaN/inf."""
    for k, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise NonFiniteWeightsError(
                f"refusing to checkpoint: {name} tensor {k!r} contains NaN or inf; the previous "
                "checkpoint is kept. Lower the lr, enable optim.clip_grad, or use amp=bf16 instead of fp16."
            )


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    weights: dict[str, dict[str, Tensor]],
    trainer_state: dict,
    keep_last: int = 2,
) -> Path:
    """Write ``checkpoints/step_<step>/`` atomically and point ``latest`` at it.

    Args:
        ckpt_root: the run's ``checkpoints`` directory.
        step: optimizer steps done.
        weights: ``{"model": sd, "objective": sd, "ema": sd}`` (``ema`` optional).
        trainer_state: tensors and primitive containers only.
        keep_last: how many step checkpoints to keep (``best/`` is separate).

    Returns:
        the checkpoint directory.
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    weights = {k: _plain_state_dict(v) for k, v in weights.items() if v is not None}
    for k, sd in weights.items():
        check_finite(k, sd)
    for stale in root.glob(".tmp_step_*"):
        shutil.rmtree(stale, ignore_errors=True)

    name = step_dir_name(step)
    tmp = root / f".tmp_{name}"
    tmp.mkdir()
    for k, sd in weights.items():
        _write_tensors(sd, tmp / f"{k}.safetensors")
    # Written last: a directory with trainer_state.pt is complete.
    torch.save(trainer_state, tmp / STATE_FILE)
    _fsync_file(tmp / STATE_FILE)
    _fsync_dir(tmp)

    final = root / name
    _replace_dir(tmp, final)
    atomic_write_text(root / LATEST, name + "\n")

    if keep_last > 0:
        for old in step_checkpoints(root)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(ckpt_root: str | Path, src: str | Path) -> Path:
    """Make ``checkpoints/best/`` a copy of checkpoint ``src`` (hard links where possible)."""
    root, src = Path(ckpt_root), Path(src)
    tmp = root / ".tmp_best"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in src.iterdir():
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    atomic_write_text(tmp / "source", src.name + "\n")
    best = root / BEST
    _replace_dir(tmp, best)
    return best


def recover_best(ckpt_root: str | Path) -> None:
    """Repair ``best/`` after a crash between the two renames of :func:`_replace_dir`.

    A crash there leaves the previous best only as ``.old_best``: it is moved back. A
    ``.old_best`` beside a complete ``best/`` is a leftover and is removed.
    """
    root = Path(ckpt_root)
    old, best = root / ".old_best", root / BEST
    if not old.is_dir():
        return
    if best.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, best)
        _fsync_dir(root)


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (or of a ``checkpoints`` dir), or None."""
    run_dir = Path(run_dir)
    return latest_checkpoint(run_dir / CHECKPOINTS if (run_dir / CHECKPOINTS).is_dir() else run_dir)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint directory, or the latest checkpoint of a run directory.

    Returns:
        ``{"path", "model", "objective", "ema" (or None), "trainer_state"}``.
    """
    path = Path(path)
    if not (path / STATE_FILE).exists():
        latest = find_latest(path)
        if latest is None:
            raise PathNotFoundError(
                f"no checkpoint in {path}: expected a checkpoint directory containing {STATE_FILE} "
                "or a run directory with checkpoints/latest"
            )
        path = latest
    device = str(map_location)
    out: dict = {"path": path}
    for k in WEIGHT_FILES:
        f = path / f"{k}.safetensors"
        out[k] = load_file(str(f), device=device) if f.exists() else None
    out["trainer_state"] = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
    return out


def capture_rng_state() -> tuple:
    """A cheap snapshot of every RNG (raw states); :func:`rng_state_to_dict` makes it saveable."""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return torch.get_rng_state(), random.getstate(), np.random.get_state(), cuda


def rng_state_to_dict(raw: tuple) -> dict:
    """A :func:`capture_rng_state` snapshot as tensors and lists (loads with ``weights_only=True``)."""
    torch_state, (version, internal, gauss), np_state, cuda = raw
    state = {
        "torch": torch_state,
        "python": [version, list(internal), gauss],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if cuda is not None:
        state["cuda"] = cuda
    return state


def get_rng_state() -> dict:
    """RNG states of torch (CPU and CUDA), numpy and python as tensors and lists."""
    return rng_state_to_dict(capture_rng_state())


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
