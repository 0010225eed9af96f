"""Checkpointer: what a run's checkpoint holds (weights files vs trainer state) and how it is restored."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..errors import WeightsError
from . import checkpoint as ckpt
from .distributed import all_gather_object, barrier, fsdp_full_state, fsdp_load_full_state


def _prefix_of(root: nn.Module, sub: nn.Module) -> str:
    for name, m in root.named_modules():
        if m is sub:
            return f"{name}." if name else ""
    raise ValueError(f"export_model() returned a {type(sub).__name__} that is not a submodule of the objective")


def _objective_state(objective: nn.Module, sd: dict | None = None) -> dict:
    fn = getattr(objective, "checkpoint_state_dict", None)
    if fn is not None:
        return fn(sd)
    return objective.state_dict() if sd is None else sd


class Checkpointer:
    """Writes and restores a :class:`~vitkit.engine.Trainer`'s checkpoints (layout: :mod:`.checkpoint`).

    Weights files: ``model`` (``objective.export_model()``, the run's product), ``objective``
    (its full state minus frozen modules it records by reference) and ``ema``. Everything
    else (optimizer, schedule, scaler, counters, RNG, sampler position, config) goes into
    ``trainer_state.pt``.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, keep_last: int, save_best: bool, is_main: bool):
        self.dir = Path(ckpt_dir)
        self.keep_last, self.save_best, self.is_main = keep_last, save_best, is_main
        if is_main:
            ckpt.recover_best(self.dir)

    def trainer_state(self, tr, optim_state: dict | None = None, rng: dict | None = None) -> dict:
        """``trainer_state.pt`` content: tensors and primitive containers only; collective (RNG gather)."""
        state = tr.state.state_dict()
        state.update(
            optimizer=optim_state if optim_state is not None else tr.optimizer.state_dict(),
            scheduler=tr.scheduler.state_dict(),
            scaler=tr.scaler.state_dict(),
            rng=all_gather_object(rng if rng is not None else ckpt.get_rng_state()),
            sampler=tr.sampler_state(),
            ema_updates=tr.ema.updates if tr.ema is not None else 0,
            budget=tr.budget.state_dict() if tr.budget is not None else None,
            references=getattr(tr.objective, "references", dict)(),
            world_size=tr.dist.world_size,
            config=tr.config_to_save,
        )
        return state

    def save(self, tr, is_best: bool = False, rng: dict | None = None) -> Path | None:
        """Write a checkpoint of ``tr``'s current step (main process); every process must call it."""
        obj = tr.objective
        export = obj.export_model() if hasattr(obj, "export_model") else obj.model
        if tr.cfg.fsdp:
            full_sd, optim_sd = fsdp_full_state(obj, tr.optimizer)
            prefix = _prefix_of(obj, export)
            model_sd = {k[len(prefix):]: v for k, v in full_sd.items() if k.startswith(prefix)}
            objective_sd = _objective_state(obj, full_sd)
        else:
            objective_sd, optim_sd, model_sd = _objective_state(obj), None, export.state_dict()
        state = self.trainer_state(tr, optim_sd, rng)
        path = None
        if self.is_main:
            weights = {
                "model": model_sd,
                "objective": objective_sd,
                "ema": tr.ema.module.state_dict() if tr.ema is not None else None,
            }
            path = ckpt.save_checkpoint(self.dir, tr.step, weights, state, keep_last=self.keep_last)
            if is_best and self.save_best:
                ckpt.save_best(self.dir, path)
        return path

    def load(self, tr, path: str | os.PathLike) -> Path:
        """Restore ``tr``'s objective, EMA, optimizer, schedule, scaler, counters and RNG from ``path``."""
        data = ckpt.load_checkpoint(path, map_location="cpu")
        st = data["trainer_state"]
        obj = tr.objective
        if hasattr(obj, "check_references"):  # frozen modules loaded again must be the recorded ones
            obj.check_references(st.get("references") or {})
        if tr.cfg.fsdp:
            fsdp_load_full_state(obj, tr.optimizer, data["objective"], st["optimizer"])
        else:
            load_objective_state(obj, data, "resume with the same objective and model as the run that wrote it")
            tr.optimizer.load_state_dict(st["optimizer"])
        if tr.ema is not None:
            if data["ema"] is None:
                raise WeightsError(f"{data['path']} has no ema.safetensors but engine.ema_decay is set")
            tr.ema.module.load_state_dict(data["ema"])
            tr.ema.updates = int(st.get("ema_updates", tr.step))
        if tr.budget is not None and st.get("budget"):  # before the schedule reads it
            tr.budget.load_state_dict(st["budget"])
        tr.scheduler.load_state_dict(st["scheduler"])
        tr.scaler.load_state_dict(st["scaler"])
        tr.state.load_state_dict(st)
        tr.resume_sampler_state = st["sampler"]
        rng = st["rng"]
        if len(rng) != tr.dist.world_size:
            tr.logger.info(
                f"checkpoint was written by {len(rng)} processes, this run has {tr.dist.world_size}: "
                "random streams restart from rank 0's state (training continues, not bitwise)"
            )
        ckpt.set_rng_state(rng[tr.dist.rank] if len(rng) == tr.dist.world_size else rng[0])
        barrier()
        return data["path"]


def load_objective_state(obj: nn.Module, data: dict, advice: str) -> None:
    """Load a checkpoint's ``data["objective"]`` into ``obj``; modules the objective holds by reference
    (a frozen teacher) may be missing. Anything else missing or unexpected is a ``WeightsError`` that ends
    with ``advice``."""
    refs = tuple(f"{n}." for n in getattr(obj, "references", dict)())
    missing, unexpected = obj.load_state_dict(data["objective"], strict=False)
    missing = [k for k in missing if not k.startswith(refs)] if refs else missing
    if missing or unexpected:
        raise WeightsError(f"{data['path']} does not fit this objective: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}; {advice}")
