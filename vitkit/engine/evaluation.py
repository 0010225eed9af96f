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
