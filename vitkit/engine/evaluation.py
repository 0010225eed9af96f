"""Evaluation loop: runs an objective's evaluator over a validation loader for a given model; which
evaluation is the best, and (``engine.end_on_best``) ending a run on it."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from . import checkpoint as ckpt
from .checkpointer import load_objective_state
from .distributed import barrier
from .failures import agree


@torch.no_grad()
def run_evaluation(
    objective: nn.Module,
    model: nn.Module,
    evaluator,
    loader: Iterable,
    prepare: Callable[[dict], dict],
    autocast: Callable,
    on_batch: Callable[[dict], None] | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` (``objective.model`` or a stand-in such as its EMA copy) on ``loader``.

    Each batch goes through ``prepare`` (device, eval transform), then
    ``objective.eval_outputs(batch, model)``, then ``evaluator.update(batch, outputs)``;
    ``evaluator.compute()`` reduces across processes. An evaluator with ``begin(objective,
    model, prepare)`` (k-NN builds its feature bank there) gets that call first. Train/eval
    modes are restored afterwards.
    """
    was_training = objective.training, model.training
    objective.eval()
    model.eval()
    try:
        evaluator.reset()
        if hasattr(evaluator, "begin"):
            evaluator.begin(objective, model, prepare)
        for batch in loader:
            batch = prepare(batch)
            if on_batch is not None:
                on_batch(batch)
            with autocast():
                outputs = objective.eval_outputs(batch, model)
            evaluator.update(batch, outputs)
    finally:
        model.train(was_training[1])
        objective.train(was_training[0])  # last: it keeps its frozen modules (a locked tower in model too) in eval
    return evaluator.compute()


def record_best(state, val: dict[str, float], evaluator) -> bool:
    """Whether ``val`` improves on the best so far by the evaluator's declared metric (``primary``,
    ``higher_is_better``): what chooses ``best/``. Updates ``state``'s best values."""
    if "acc1" in val:  # reported in the summary beside the primary metric
        state.best_val_acc = max(val["acc1"], state.best_val_acc or 0.0)
    if evaluator is None or evaluator.primary not in val:
        return False
    improved = state.improves(val[evaluator.primary], evaluator.higher_is_better)
    if improved:
        state.best_metric, state.best_metric_name = val[evaluator.primary], evaluator.primary
    return improved


def log_val(logger, step: int, epoch: int, val: dict) -> None:
    """One ``val`` record in metrics.jsonl and a line on the console."""
    logger.log({"kind": "val", "step": step, "epoch": epoch, **val})
    parts = " ".join(f"{k}={v:.4f}" for k, v in val.items() if isinstance(v, float) and not k.startswith("_"))
    logger.info(f"eval step {step} epoch {epoch}: {parts}")


def evaluate_with_ema(tr) -> dict[str, float]:
    """Trainer ``tr``'s ``evaluate()``, with its EMA copy's metrics as ``ema_*``; an error is agreed on by
    every process."""
    error, val = None, {}
    try:
        val = tr.evaluate()
        if tr.ema is not None and val:
            val.update({f"ema_{k}": v for k, v in tr.evaluate(use_ema=True).items()})
    except Exception as e:
        error = e
    agree(error)
    return val


def end_on_best(tr) -> None:
    """``engine.end_on_best`` for trainer ``tr`` at the end of its run: when ``checkpoints/best/`` holds an
    earlier step than the last, load its weights (objective and EMA) and evaluate them, so that what the
    run writes and reports is its best point on validation (``tr.ended_on_best`` records both steps and
    scores). The checkpoints, ``latest`` included, stay: a resume continues from the last step. Under
    FSDP (sharded weights) the last weights stay."""
    barrier()  # the main process has written best/ before any process reads it
    best = tr.checkpointer.dir / ckpt.BEST
    if not best.is_dir() or tr.cfg.fsdp:
        return
    data = ckpt.load_checkpoint(best, map_location="cpu")
    step = int(data["trainer_state"]["step"])
    if step == tr.step:
        return
    final = {k: v for k, v in tr.last_val.items() if not k.startswith("_")}
    load_objective_state(tr.objective, data, "engine.end_on_best needs best/ written by this run")
    if tr.ema is not None and data["ema"] is not None:
        tr.ema.module.load_state_dict(data["ema"])
    name, value = tr.state.best_metric_name, tr.state.best_metric
    tr.ended_on_best = {"step": step, "metric": name, "value": value, "final_step": tr.step,
                        "final_value": final.get(name)}
    tr.logger.info(f"end_on_best: the run keeps the weights of step {step} ({name} {value:.4g}; last step "
                   f"{tr.step}: {final.get(name, float('nan')):.4g})")
    tr.last_val = evaluate_with_ema(tr)  # the summary describes the weights the run writes
    tr.logger.log({"kind": "end_on_best", "step": step, "final_step": tr.step, **tr.last_val})
