"""A wall-clock budget for a whole run: parsing ("10m"), the clock, and the share kept for the end.

The budget counts from when the run started (``vitkit.train()`` creates the :class:`Budget`
before scanning the data), so ``engine.time_budget=10m`` means the command takes 10 minutes.
Training gets ``train_budget = total - reserve``; the reserve pays for the final evaluation,
checkpoint and summary. The lr schedule follows ``progress() = elapsed / train_budget``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from ..errors import ConfigError

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
