"""Time-budget schedules: duration parsing, annealing at the budget's end, throughput swings, resume."""

from __future__ import annotations

import math
import types

import pytest
import torch
from helpers import Crash, CrashAt, assert_same_state, make_trainer, noise_transform

from vitkit.engine import trainer as trainer_mod
from vitkit.engine.budget import Budget, end_reserve, parse_duration
from vitkit.engine.config import ScheduleConfig
from vitkit.engine.schedule import MAX_WARMUP_PROGRESS, LRSchedule, decay_lr
from vitkit.errors import ConfigError


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400), ("1m30s", 90), (45, 45), ("2.5", 2.5), ("0.5m", 30)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["ten minutes", "10x", "m", "", "-5", 0, "1m1h"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ConfigError, match="time_budget"):
        parse_duration(bad)


def test_parse_duration_none():
    assert parse_duration(None) is None


def _opt():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def _run(sched: LRSchedule, clock: FakeClock, dts) -> list[float]:
    lrs = []
    for dt in dts:
        clock.t += dt
        sched.step()
        lrs.append(sched.get_lr())
    return lrs


def test_budget_schedule_anneals_at_budget_end():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr=1e-5, warmup_lr=0.0)
    clock = FakeClock()
    budget = Budget(100.0, clock=clock)
    # total_steps far beyond what the budget allows: the time, not the steps, ends the run.
    sched = LRSchedule(_opt(), cfg, 1.0, total_steps=10**6, steps_per_epoch=100, budget=budget)
    lrs = _run(sched, clock, [1.0] * 100)
    assert lrs[4] == pytest.approx(0.5)  # step 5 of a 10-step linear warmup
    assert sched.warmup_end == pytest.approx(0.10)
    assert budget.progress() == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(1e-5)  # min_lr exactly when the budget ends
    # Halfway through the decay phase the cosine is at its midpoint.
    assert lrs[54] == pytest.approx(1e-5 + 0.5 * (1 - 1e-5))


def test_budget_schedule_follows_time_through_a_throughput_swing():
    """Steps 3x faster in the second half: the lr still depends on elapsed time only."""
    cfg = ScheduleConfig(name="onecycle", warmup_steps=5, min_lr=0.0, warmup_lr=0.0)
    clock = FakeClock()
    budget = Budget(60.0, clock=clock)
    sched = LRSchedule(_opt(), cfg, 2.0, total_steps=10**6, steps_per_epoch=50, budget=budget)
    dts = [0.5] * 60 + [1 / 6] * 180  # 30 s at 2 steps/s, then 30 s at 6 steps/s
    lrs = _run(sched, clock, dts)
    w = sched.warmup_end
    assert w == pytest.approx(2.5 / 60)
    elapsed = 0.0
    for i, dt in enumerate(dts):
        elapsed += dt
        if i >= 5:
            assert lrs[i] == pytest.approx(decay_lr((elapsed / 60 - w) / (1 - w), cfg, 2.0), abs=1e-9)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)


def test_budget_warmup_is_capped_by_progress():
    """A slow machine must not spend the budget warming up: warmup ends at 25% at the latest."""
    cfg = ScheduleConfig(name="cosine", warmup_steps=1000, min_lr=0.0, warmup_lr=0.0)
    clock = FakeClock()
    sched = LRSchedule(_opt(), cfg, 1.0, total_steps=10**6, steps_per_epoch=10, budget=Budget(40.0, clock=clock))
    lrs = _run(sched, clock, [1.0] * 40)
    assert lrs[4] == pytest.approx(5 / (MAX_WARMUP_PROGRESS * 40))
    assert sched.warmup_end == pytest.approx(MAX_WARMUP_PROGRESS)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_budget_schedule_resumes_on_the_same_curve():
    cfg = ScheduleConfig(name="cosine", warmup_steps=8, min_lr=1e-4, warmup_lr=0.0)
    dts = [0.3 + 0.2 * math.sin(i) for i in range(120)]
    clock = FakeClock()
    full = LRSchedule(_opt(), cfg, 1.0, 10**6, 30, budget=Budget(sum(dts), clock=clock))
    expected = _run(full, clock, dts)

    clock = FakeClock()
    first = LRSchedule(_opt(), cfg, 1.0, 10**6, 30, budget=Budget(sum(dts), clock=clock))
    got = _run(first, clock, dts[:50])
    saved_sched, saved_budget = first.state_dict(), first.budget.state_dict()

    clock2 = FakeClock(t=5.0)  # a new process: a different absolute clock
    budget2 = Budget(sum(dts), clock=clock2)
    second = LRSchedule(_opt(), cfg, 1.0, 10**6, 30, budget=budget2)
    budget2.load_state_dict(saved_budget)
    second.load_state_dict(saved_sched)
    assert second.get_lr() == pytest.approx(got[-1])
    got += _run(second, clock2, dts[50:])
    assert got == pytest.approx(expected, rel=1e-12)


def test_budget_reserve_and_train_budget():
    clock = FakeClock()
    b = Budget(600.0, clock=clock)
    b.reserve_s = end_reserve(600.0, n_val=1000, eval_img_per_s=220.0)
    assert b.reserve_s == pytest.approx(1.1 * 1000 / 220 + 3.0 + 6.0)
    assert b.train_budget == pytest.approx(600 - 14.0)
    b.note_eval(10.0)
    assert b.reserve_s == pytest.approx(11.0 + 3.0 + 6.0)
    clock.t += 293.0
    assert b.progress() == pytest.approx(293.0 / 580.0)


def test_budget_reserve_grows_when_the_machine_slows_down():
    clock = FakeClock()
    b = Budget(600.0, clock=clock)
    b.set_eval_rate(1000.0, n_val=5000, train_img_per_s=400.0)
    reserve = 1.1 * 5 + 3.0 + 6.0
    assert b.train_budget == pytest.approx(600 - reserve)
    samples = seconds = 0.0
    for step in range(1, 31):  # 400 img/s
        samples, seconds = samples + 400, seconds + 1.0
        b.on_step(step, samples, seconds, n_val=5000)
    assert b.slowdown() == pytest.approx(1.0)
    for step in range(31, 131):  # another job takes the cores: 100 img/s
        samples, seconds = samples + 100, seconds + 1.0
        b.on_step(step, samples, seconds, n_val=5000)
    assert b.slowdown() == pytest.approx(4.0, rel=1e-3)
    assert b.train_budget == pytest.approx(600 - 4.0 * reserve, rel=1e-3)


def test_budget_reserve_is_estimated_at_step_10_or_after_5_percent():
    clock = FakeClock()
    b = Budget(100.0, clock=clock)
    b.on_step(3, 300, 1.0, n_val=600)
    assert b.reserve_s is None
    clock.t += 5.5  # 5.5% of the budget, still before step 10: all steps so far, 150 img/s
    b.on_step(4, 300, 2.0, n_val=600)
    assert b.reserve_s == pytest.approx(1.1 * 600 / 450 + 3.0 + 1.0)  # eval counted at 3x
    b.on_step(5, 400, 2.5, n_val=600)
    b.on_step(9, 800, 3.5, n_val=600)
    assert b.reserve_s == pytest.approx(1.1 * 600 / 450 + 4.0)  # unchanged until step 10
    b.on_step(10, 900, 3.75, n_val=600)  # steps 6-10: 500 images in 1.25 s = 400 img/s
    assert b.reserve_s == pytest.approx(1.1 * 600 / 1200 + 4.0)
    # A measured evaluation rate (the plan's calibration) takes precedence over the estimate.
    b.set_eval_rate(1200.0, n_val=600)
    assert b.reserve_s == pytest.approx(1.1 * 0.5 + 4.0)
    b.on_step(10, 1000, 2.5, n_val=600)
    assert b.reserve_s == pytest.approx(1.1 * 0.5 + 4.0)


class _Tick:
    """Train transform: every batch takes ``dt`` seconds of the fake clock (before its step)."""

    def __init__(self, clock: FakeClock, dt: float):
        self.clock, self.dt = clock, dt

    def __call__(self, batch):
        self.clock.t += self.dt
        return noise_transform(batch)


def _budget_trainer(path, clock, monkeypatch, hooks=(), **kw):
    # The trainer's own timings (train rate, eval time) read the fake clock too: deterministic.
    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(perf_counter=clock, time=clock))
    tr = make_trainer(path, epochs=1000, time_budget="20s", hooks=hooks, transform=_Tick(clock, 0.5), **kw)
    tr.budget = tr.scheduler.budget = Budget(20.0, clock=clock)
    tr.scheduler._apply()
    return tr


def test_trainer_stops_at_budget_and_resumes_same_curve(tmp_path, monkeypatch):
    clock = FakeClock()
    full = _budget_trainer(tmp_path / "full", clock, monkeypatch)
    s = full.fit()
    assert s["stopped"] == "time_budget"
    # Evaluations take no fake time, so the reserve is the fixed margin: 3 s + 1% of 20 s.
    assert full.budget.reserve_s == pytest.approx(3.2)
    assert full.step == math.ceil((20.0 - 3.2) / 0.5)
    assert full.scheduler.progress() >= 1.0
    assert full.scheduler.get_lr() == pytest.approx(1e-4)  # annealed to min_lr as the budget ends

    clock = FakeClock()
    with pytest.raises(Crash):
        _budget_trainer(tmp_path / "run", clock, monkeypatch, hooks=[CrashAt(13)], ckpt_every_steps=4).fit()
    clock = FakeClock(t=0.0)
    resumed = _budget_trainer(tmp_path / "run", clock, monkeypatch, ckpt_every_steps=4)
    resumed.fit(resume=True)
    assert resumed.step == full.step
    assert resumed.scheduler.get_lr() == full.scheduler.get_lr()
    assert_same_state(full.objective.state_dict(), resumed.objective.state_dict(), "objective")


def test_progress_under_a_budget_shows_the_steps_the_budget_will_reach(tmp_path, monkeypatch):
    clock = FakeClock()
    tr = _budget_trainer(tmp_path / "run", clock, monkeypatch)
    shown = []
    progress = tr.logger.progress
    monkeypatch.setattr(tr.logger, "progress", lambda step, total, record, eta, approx=False: (
        shown.append((step, total, approx)), progress(step, total, record, eta, approx)))
    tr.fit()
    # Every step takes 0.5 s. At step 2 no end reserve is sized yet: 2 + 19 s left / 0.5 s = 40.
    # Later the display follows the reserve (an estimate, then measured evaluations) and ends at the
    # run's real length, 34 steps (20 s less a 3.2 s reserve), never the epoch cap's step count.
    assert tr.step == 34 and tr.total_steps > 1000
    assert shown[0] == (2, 40, True) and shown[-1] == (34, 34, True)
    assert all(approx and step <= total <= 40 for step, total, approx in shown)
