"""Train state: every counter of a run in one place, saved and restored as one state dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class TrainState:
    """Where a run is and what it has counted so far.

    ``step`` counts optimizer steps (skipped non-finite steps included), ``epoch`` completed
    epochs, ``epoch_step`` optimizer steps into the current epoch. ``best_metric`` is the best
    value of the evaluator's primary metric (``best_metric_name``), ``best_val_acc`` the best
    top-1 accuracy when there is one. ``train_samples`` counts samples over all processes.
    """

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    best_metric: float | None = None
    best_metric_name: str | None = None
    best_val_acc: float | None = None
    nonfinite_skipped: int = 0
    skipped_files: int = 0
    train_samples: int = 0
    train_time_s: float = 0.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])

    def improves(self, value: float, higher_is_better: bool) -> bool:
        """Whether ``value`` of the primary metric beats the best so far."""
        if self.best_metric is None:
            return True
        return value > self.best_metric if higher_is_better else value < self.best_metric
