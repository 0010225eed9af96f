"""Evaluation loop: runs an objective's evaluator over a validation loader for a given model."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


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
        objective.train(was_training[0])
        model.train(was_training[1])
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
