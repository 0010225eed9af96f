"""A run's budget: the wall-clock (parsing "10m", the clock, the share kept for the end), and the
early stop that gives back what a plateaued run would waste of it.

The budget counts from when the run started (``vitkit.train()`` creates the :class:`Budget`
before scanning the data), so ``engine.time_budget=10m`` means the command takes 10 minutes.
Training gets ``train_budget = total - reserve``; the reserve pays for the final evaluation,
checkpoint and summary. The lr schedule follows ``progress() = elapsed / train_budget``.

:class:`PlateauStop` (``engine.plateau_patience``) ends a run whose validation metric has not
improved for a share of that progress, after annealing the lr (see its docstring).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .distributed import all_reduce_sum, get_world_size

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")

# What the end of a run costs besides evaluation: checkpoint, weights, summary, plots.
END_MARGIN_S = 3.0
END_MARGIN_FRAC = 0.01


def parse_duration(value: str | float | int | None) -> float | None:
    """Seconds in ``value``: a number of seconds, or "90s", "10m", "2h", "1h30m"; None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            m = _DURATION.match(text)
            if not text or m is None or not any(m.groups()):
                raise ConfigError(
                    f"engine.time_budget={value!r} is not a duration: use seconds (600) or a string like "
                    "'90s', '10m', '2h' or '1h30m'"
                ) from None
            seconds = sum(float(g) * u for g, u in zip(m.groups(), _UNITS.values()) if g)
    if seconds <= 0:
        raise ConfigError(f"engine.time_budget must be positive, got {value!r}")
    return seconds


def end_reserve(total_s: float, n_val: int, eval_img_per_s: float) -> float:
    """Seconds to keep for the end: one evaluation of ``n_val`` images (10% slack) plus a margin."""
    return 1.1 * n_val / max(eval_img_per_s, 1e-6) + END_MARGIN_S + END_MARGIN_FRAC * total_s


def loader_samples(loader) -> int:
    """Images one pass over ``loader`` evaluates (0 without a loader)."""
    if loader is None:
        return 0
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    return len(loader) * (getattr(loader, "batch_size", None) or 1)


class Budget:
    """The run's clock. ``clock`` is injectable (tests use a fake one); ``elapsed_before`` carries
    the time a resumed run had already spent."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic, elapsed_before: float = 0.0):
        self.total_s = float(total_s)
        self.clock = clock
        self.t0 = clock()
        self.elapsed_before = float(elapsed_before)
        self.reserve_s: float | None = None
        # A measured evaluation rate (the plan's calibration); without one, the train rate estimates it.
        self.eval_img_per_s: float | None = None
        self._mark: tuple[float, float] | None = None  # (samples, train seconds) after step 5
        # The reserve was sized at train rate ``ref_rate``; when the machine slows down (``rate``, a
        # running average of recent steps, drops) the final evaluation will be slower by as much.
        self.ref_rate: float | None = None
        self.rate: float | None = None
        self._last: tuple[float, float] = (0.0, 0.0)

    def slowdown(self) -> float:
        """How much slower training runs now than when the reserve was sized (1 to 10)."""
        if not self.ref_rate or not self.rate:
            return 1.0
        return min(10.0, max(1.0, self.ref_rate / self.rate))

    def elapsed(self) -> float:
        return self.elapsed_before + self.clock() - self.t0

    @property
    def train_budget(self) -> float:
        # Never let the reserve eat more than half of the budget.
        return self.total_s - min((self.reserve_s or 0.0) * self.slowdown(), 0.5 * self.total_s)

    def progress(self) -> float:
        """Fraction of the training budget spent (>= 1: time to stop training)."""
        return self.elapsed() / self.train_budget

    def remaining(self) -> float:
        return max(0.0, self.train_budget - self.elapsed())

    def on_step(self, step: int, train_samples: int, train_time_s: float, n_val: int) -> None:
        """After optimizer step ``step``: without a measured evaluation rate, estimate the reserve from
        the training rate of steps 6-10, past the slow first steps (forward-only evaluation runs at
        about 3x the training rate), at fixed steps so that a resumed run makes the same estimate;
        earlier, from all steps so far, if 5% of the budget passes without one. Also keeps the
        running train rate that :meth:`slowdown` compares."""
        d_samples, d_seconds = train_samples - self._last[0], train_time_s - self._last[1]
        self._last = (train_samples, train_time_s)
        if step > 1 and d_seconds > 0:  # the first step pays for warm-up
            now = d_samples / d_seconds
            self.rate = now if self.rate is None else 0.9 * self.rate + 0.1 * now
        if self.eval_img_per_s is not None:
            return
        if step == 5:
            self._mark = (train_samples, train_time_s)
        if step == 10 and self._mark is not None:
            samples, seconds = train_samples - self._mark[0], train_time_s - self._mark[1]
        elif self.reserve_s is None and self.progress() > 0.05:
            samples, seconds = train_samples, train_time_s
        else:
            return
        self.ref_rate = samples / max(seconds, 1e-9)
        self.reserve_s = end_reserve(self.total_s, n_val, 3.0 * self.ref_rate)

    def note_eval(self, seconds: float) -> None:
        """A measured evaluation: the final one will cost about as much (10% slack)."""
        self.reserve_s = 1.1 * seconds + END_MARGIN_S + END_MARGIN_FRAC * self.total_s
        self.ref_rate = self.rate

    def set_eval_rate(self, eval_img_per_s: float, n_val: int, train_img_per_s: float | None = None) -> None:
        """A measured evaluation rate (and the train rate measured with it): the reserve follows from it
        (until an evaluation is timed)."""
        self.eval_img_per_s = eval_img_per_s
        self.reserve_s = end_reserve(self.total_s, n_val, eval_img_per_s)
        self.ref_rate = train_img_per_s

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed(), "reserve_s": self.reserve_s, "mark": self._mark,
                "eval_img_per_s": self.eval_img_per_s, "ref_rate": self.ref_rate, "rate": self.rate,
                "last": self._last}

    def load_state_dict(self, state: dict) -> None:
        self.t0 = self.clock()
        self.elapsed_before = float(state["elapsed"])
        self.reserve_s = state.get("reserve_s")
        self._mark = tuple(state["mark"]) if state.get("mark") else None
        self.eval_img_per_s, self.ref_rate, self.rate = state["eval_img_per_s"], state["ref_rate"], state["rate"]
        self._last = tuple(state["last"])


# ------------------------------------------------------------------ early stop on a plateau

# The cool-down after a plateau lasts this share of the optimizer steps trained so far. Hägele et
# al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations") find that
# a run cooled down to its final lr over the last 10-20% of its steps matches a cosine schedule of
# the same length; this is the upper end of that range.
REANNEAL_SHARE = 0.2
# Schedules that end annealed: a plateaued run under one of them anneals before it stops.
ANNEALING_SCHEDULES = ("cosine", "onecycle")
# Progress is a ratio of step counts (or seconds): a gap of exactly ``patience`` must count despite rounding.
_EPS = 1e-9


@dataclass
class PlateauState:
    """Where the plateau stop stands. It is saved with the lr schedule (``LRSchedule.plateau``),
    which every checkpoint restores: a resumed run finds the same plateau and anneals over the same steps.

    ``best`` is the best value of the watched metric so far, reached after ``best_step`` steps at
    run progress ``best_progress``. Once a plateau is found: ``found_step``, the cool-down's length
    ``tail_steps`` (0: the run stops at once), the lr it starts from (``tail_lr``) and the progress
    it starts at (``tail_progress``). ``record`` is summary.json's ``plateau_stop``, set at the stop.
    """

    best: float | None = None
    best_step: int = 0
    best_progress: float = 0.0
    found_step: int | None = None
    tail_steps: int = 0
    tail_lr: float = 0.0
    tail_progress: float = 0.0
    record: dict | None = None


class PlateauStop:
    """Ends a run whose validation metric has stopped improving: a hook of the
    :class:`~vitkit.engine.Trainer` (``Trainer(..., hooks=[PlateauStop(0.2)])``).

    At each evaluation the watched metric (``metric``; by default the evaluator's primary metric,
    the one that picks ``best/``) is compared with the best so far: any strict improvement resets
    the count, as Keras' ``EarlyStopping`` does with its default ``min_delta=0``. When none came for
    ``patience`` of the run's progress (the share of the time budget; without one, of the steps the
    epochs make), the run has plateaued. Under a schedule that ends annealed (``cosine``,
    ``onecycle``) the lr then cools down from its current value to ``min_lr`` along the schedule's
    cosine, over :data:`REANNEAL_SHARE` of the steps trained so far (by the budget's end at the
    latest), and the run stops after it; under ``constant``, or with the lr already at ``min_lr``,
    it stops at once. A plateau found so late that the run would end within the cool-down anyway
    changes nothing.

    Validation sets of fewer than ``min_val`` images never stop a run: on so few images the noise of
    the metric hides whether it still improves. Every process takes the same progress, so
    distributed runs decide alike. The state lives in the schedule (:class:`PlateauState`), so a
    resumed run stops where the uninterrupted one would have. :func:`plateau_record` gives
    summary.json's ``plateau_stop``.
    """

    def __init__(self, patience: float, min_val: int = 200, metric: str | None = None,
                 reanneal_share: float = REANNEAL_SHARE):
        if not 0 < patience <= 1:
            raise ConfigError(
                f"engine.plateau_patience={patience!r} is a share of the run's budget: use a number in (0, 1], "
                "e.g. 0.2 (stop after 20% of the budget without improvement), or null to never stop early"
            )
        if min_val < 0:
            raise ConfigError(f"engine.plateau_min_val must be a number of validation images >= 0, got {min_val!r}")
        if not 0 <= reanneal_share <= 1:
            raise ValueError(f"reanneal_share must be in [0, 1], got {reanneal_share}")
        self.patience, self.min_val = float(patience), int(min_val)
        self.metric, self.reanneal_share = metric, float(reanneal_share)
        self._told = False

    def _say_once(self, trainer, msg: str) -> None:
        if not self._told:
            trainer.logger.info(msg)
            self._told = True

    def on_epoch_end(self, trainer, epoch: int, val: dict) -> None:
        sched, evaluator = trainer.scheduler, trainer.last_evaluator
        st = sched.plateau
        if st.found_step is not None or not val or evaluator is None:
            return
        n_val = loader_samples(trainer.val_loader)
        if n_val < self.min_val:
            self._say_once(trainer, f"no plateau stop: {n_val} validation images are fewer than "
                                    f"engine.plateau_min_val={self.min_val}, too few to tell a plateau from noise")
            return
        name = self.metric or evaluator.primary
        if name not in val:
            reported = ", ".join(k for k in val if not k.startswith("_"))
            self._say_once(trainer, f"no plateau stop: the evaluation reports no {name!r} (it reports {reported})")
            return
        higher = evaluator.higher_is_better if name == evaluator.primary else "loss" not in name
        value, step = float(val[name]), sched.step_count
        # The processes' clocks differ a little: all take the mean progress, so all decide alike.
        progress = float(all_reduce_sum(torch.tensor([sched.progress()], dtype=torch.float64))[0]) / get_world_size()
        if st.best is None or (value > st.best if higher else value < st.best):
            st.best, st.best_step, st.best_progress = value, step, progress
            return
        if step < 1 or progress - st.best_progress < self.patience - _EPS:
            return
        annealing = sched.cfg.name.lower() in ANNEALING_SCHEDULES and sched.get_lr() > sched.cfg.min_lr
        tail = math.ceil(self.reanneal_share * step - _EPS) if annealing else 0
        if tail and progress * (step + tail) / step >= 1:
            return  # the schedule anneals, and the run ends, within the cool-down anyway
        st.found_step, st.tail_steps = step, tail
        why = (f"val {name} has not improved on {st.best:.4g} (step {st.best_step}) for "
               f"{progress - st.best_progress:.0%} of the run")
        if tail:
            sched.reanneal(tail)
            trainer.logger.info(f"plateau: {why}; annealing the lr to {sched.cfg.min_lr:g} over {tail} steps, then stopping")
        else:
            trainer.logger.info(f"plateau: {why}; stopping")
            self._stop(trainer)

    def on_step_end(self, ctx) -> None:
        sched = ctx.trainer.scheduler
        st = sched.plateau
        if st.found_step is not None and sched.step_count >= st.found_step + st.tail_steps:
            self._stop(ctx.trainer)

    def _stop(self, trainer) -> None:
        st = trainer.scheduler.plateau
        if st.record is None:
            spent, saved = _spent_and_saved(trainer)
            st.record = {
                "at_step": trainer.step, "at_s": round(spent, 2), "saved_s": round(saved, 2),
                "found_at_step": st.found_step, "reanneal_steps": st.tail_steps,
                "metric": self.metric or getattr(trainer.last_evaluator, "primary", None), "best": st.best,
                "best_at_step": st.best_step,
            }
        trainer.should_stop = True


def _spent_and_saved(trainer) -> tuple[float, float]:
    """(seconds of the run so far, training seconds the rest of the run would have taken): by the
    budget's clock under a time budget (capped by the steps left), else from the train time per step."""
    st = trainer.state
    by_steps = max(0, trainer.total_steps - trainer.step) * st.train_time_s / max(trainer.step, 1)
    if trainer.budget is None:
        return st.train_time_s, by_steps
    return trainer.budget.elapsed(), min(trainer.budget.remaining(), by_steps)


def plateau_record(trainer) -> dict | None:
    """summary.json's ``plateau_stop`` for ``trainer``: where the run stopped (``at_step``, ``at_s``: seconds
    of the run, by the budget's clock or else of training), the seconds it did not spend
    (``saved_s``), the step the plateau was found at and the cool-down's length, and the metric's
    best value and its step; None when no plateau stopped the run."""
    st = getattr(trainer.scheduler, "plateau", None)
    return dict(st.record) if st is not None and st.record is not None else None
