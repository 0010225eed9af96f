"""Early stop on a plateau: the rule on scripted metric sequences, the cool-down of the lr, the
too-small validation set, the time budget, the summary record, and an exact resume mid-cool-down."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import Crash, CrashAt, assert_same_run, make_trainer
from torch import nn

from vitkit.engine import find_latest
from vitkit.engine.budget import REANNEAL_SHARE, Budget, PlateauStop, plateau_record
from vitkit.engine.config import ScheduleConfig
from vitkit.engine.evaluators import Evaluator
from vitkit.engine.schedule import LRSchedule
from vitkit.errors import ConfigError
from vitkit.objectives import Supervised

BASE_LR, MIN_LR = 2.0, 1e-3


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeTrainer:
    """What :class:`PlateauStop` reads of a Trainer: a real schedule, driven step by step by :func:`drive`."""

    def __init__(self, total_steps: int = 1000, n_val: int = 500, sched: str = "onecycle", budget=None):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        cfg = ScheduleConfig(name=sched, warmup_steps=0, min_lr=MIN_LR, warmup_lr=0.0)
        self.scheduler = LRSchedule(opt, cfg, BASE_LR, total_steps, steps_per_epoch=10, budget=budget)
        self.budget, self.total_steps = budget, total_steps
        self.val_loader = SimpleNamespace(dataset=range(n_val))
        self.last_evaluator = SimpleNamespace(primary="acc1", higher_is_better=True)
        self.lines: list[str] = []
        self.logger = SimpleNamespace(info=self.lines.append)
        self.state = SimpleNamespace(train_time_s=0.0)
        self.should_stop = False

    @property
    def step(self) -> int:
        return self.scheduler.step_count


def drive(tr: FakeTrainer, hook: PlateauStop, values, every: int = 10, clock: FakeClock | None = None,
          dt=0.125) -> list[float]:
    """Train ``every`` steps (``dt`` seconds each, or ``dt(step)``), then evaluate to the next of
    ``values``, as the trainer orders its calls; until the values, the run or the hook end it.
    Returns the lr each step used."""
    lrs = []
    for epoch, value in enumerate(values, 1):
        for _ in range(every):
            lrs.append(tr.scheduler.get_lr())
            seconds = dt(tr.step) if callable(dt) else dt
            if clock is not None:
                clock.t += seconds
            tr.state.train_time_s += seconds
            tr.scheduler.step()
            hook.on_step_end(SimpleNamespace(trainer=tr))
            budget_over = tr.budget is not None and tr.budget.progress() >= 1
            if tr.should_stop or tr.step >= tr.total_steps or budget_over:
                return lrs
        val = value if isinstance(value, dict) else {"acc1": value}
        hook.on_epoch_end(tr, epoch, dict(val))
        if tr.should_stop:
            return lrs
    return lrs


def onecycle(i: int, total: int = 1000) -> float:
    """The lr of step i + 1 under onecycle without warmup, by hand."""
    return MIN_LR + 0.5 * (BASE_LR - MIN_LR) * (1 + math.cos(math.pi * i / total))


def cool_down(lr0: float, k: int, steps: int) -> float:
    """The lr of the k-th step (from 0) of a cool-down from lr0 over ``steps``, by hand."""
    return MIN_LR + 0.5 * (lr0 - MIN_LR) * (1 + math.cos(math.pi * k / steps))


def plateau_after(best_eval: int, n: int = 100, level: float = 1.0) -> list[float]:
    """Rises for ``best_eval`` evaluations, then stays at its best."""
    return [level * min(e, best_eval) / best_eval for e in range(1, n + 1)]


def test_improving_metric_never_stops():
    tr = FakeTrainer()
    lrs = drive(tr, PlateauStop(0.1), [0.01 * e for e in range(1, 101)])
    assert tr.step == 1000 and not tr.should_stop and plateau_record(tr) is None
    assert lrs == pytest.approx([onecycle(i) for i in range(1000)], rel=1e-12)


def test_plateau_anneals_then_stops():
    # Best at evaluation 10 (step 100, 10% of the run); patience 20%: found at evaluation 30 (step 300).
    tr = FakeTrainer()
    lrs = drive(tr, PlateauStop(0.2), plateau_after(10))
    tail = math.ceil(REANNEAL_SHARE * 300)
    assert tail == 60 and tr.should_stop and tr.step == 300 + tail
    rec = plateau_record(tr)
    assert rec["at_step"] == 360 and rec["found_at_step"] == 300 and rec["reanneal_steps"] == 60
    assert rec["best"] == 1.0 and rec["best_at_step"] == 100 and rec["metric"] == "acc1"
    # No time budget: the run would have trained its 640 remaining steps at the measured 0.125 s each.
    assert rec["at_s"] == pytest.approx(360 * 0.125) and rec["saved_s"] == pytest.approx(640 * 0.125)
    assert lrs[:300] == pytest.approx([onecycle(i) for i in range(300)], rel=1e-12)
    lr0 = onecycle(300)
    assert lrs[300:] == pytest.approx([cool_down(lr0, k, 60) for k in range(60)], rel=1e-12)
    assert tr.scheduler.get_lr() == pytest.approx(MIN_LR)  # annealed when it stops
    assert any("annealing the lr" in line for line in tr.lines)


def test_noisy_plateau_stops_as_the_flat_one():
    """Values that wander below the best are a plateau: only a new best resets the count."""
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(100, generator=g) * 0.05).tolist()
    values = [v if e < 10 else v - noise[e] for e, v in enumerate(plateau_after(10))]
    tr = FakeTrainer()
    drive(tr, PlateauStop(0.2), values)
    assert plateau_record(tr)["found_at_step"] == 300 and tr.step == 360


def test_one_noisy_new_best_restarts_the_count():
    values = plateau_after(10)
    values[24] = 1.001  # evaluation 25 (step 250) beats 1.0 by a hair
    tr = FakeTrainer()
    drive(tr, PlateauStop(0.2), values)
    rec = plateau_record(tr)
    assert rec["best_at_step"] == 250 and rec["found_at_step"] == 450
    assert rec["at_step"] == 450 + math.ceil(REANNEAL_SHARE * 450)


def test_noisy_but_improving_metric_never_stops():
    # A trend of 0.01 per evaluation under noise of +-0.03 makes a new best at least every 7
    # evaluations (7% of the run), well within a patience of 20%.
    g = torch.Generator().manual_seed(1)
    noise = ((torch.rand(100, generator=g) * 2 - 1) * 0.03).tolist()
    tr = FakeTrainer()
    drive(tr, PlateauStop(0.2), [0.01 * e + noise[e - 1] for e in range(1, 101)])
    assert tr.step == 1000 and plateau_record(tr) is None


@pytest.mark.parametrize(("n_val", "stops"), [(199, False), (200, True)])
def test_small_validation_sets_never_stop(n_val, stops):
    tr = FakeTrainer(n_val=n_val)
    drive(tr, PlateauStop(0.2, min_val=200), plateau_after(10))
    assert (plateau_record(tr) is not None) == stops
    assert tr.step == (360 if stops else 1000)
    assert any("fewer than engine.plateau_min_val=200" in line for line in tr.lines) == (not stops)


def test_constant_schedule_stops_at_once():
    tr = FakeTrainer(sched="constant")
    lrs = drive(tr, PlateauStop(0.2), plateau_after(10))
    rec = plateau_record(tr)
    assert rec["at_step"] == rec["found_at_step"] == 300 and rec["reanneal_steps"] == 0
    assert tr.step == 300 and set(lrs) == {BASE_LR}


def test_late_plateau_changes_nothing():
    # Found at 85% of the run: a cool-down of 20% of 850 steps would end after the run does.
    tr = FakeTrainer()
    lrs = drive(tr, PlateauStop(0.1), plateau_after(75))
    assert tr.step == 1000 and plateau_record(tr) is None
    assert lrs == pytest.approx([onecycle(i) for i in range(1000)], rel=1e-12)


def test_watched_metric_can_differ_from_the_primary_one():
    """``metric="balanced_acc"``: accuracy still rises (the majority class), balanced accuracy does not."""
    values = [{"acc1": 0.01 * e, "balanced_acc": min(e, 10) / 10} for e in range(1, 101)]
    tr = FakeTrainer()
    drive(tr, PlateauStop(0.2, metric="balanced_acc"), values)
    rec = plateau_record(tr)
    assert rec["metric"] == "balanced_acc" and rec["found_at_step"] == 300


def test_lower_is_better_metric():
    tr = FakeTrainer()
    tr.last_evaluator = SimpleNamespace(primary="loss", higher_is_better=False)
    drive(tr, PlateauStop(0.2), [{"loss": 1 - v} for v in plateau_after(10)])
    assert plateau_record(tr)["found_at_step"] == 300


def test_time_budget_plateau_and_saved_time():
    """Under a time budget the patience is a share of the time: the same plateau at 0.125 s a step."""
    clock = FakeClock()
    budget = Budget(125.0, clock=clock)  # 1000 steps of 0.125 s
    tr = FakeTrainer(total_steps=10**6, budget=budget)
    lrs = drive(tr, PlateauStop(0.2), plateau_after(10), clock=clock)
    rec = plateau_record(tr)
    assert rec["found_at_step"] == 300 and rec["at_step"] == 360
    assert rec["at_s"] == pytest.approx(45.0) and rec["saved_s"] == pytest.approx(125.0 - 45.0)
    assert lrs[:300] == pytest.approx([onecycle(i) for i in range(300)], rel=1e-9)
    assert lrs[300:] == pytest.approx([cool_down(onecycle(300), k, 60) for k in range(60)], rel=1e-9)


def test_cool_down_ends_by_the_budget_end_on_a_slowing_machine():
    """After the plateau each step takes 2.5 s: the budget ends before 60 steps, the lr is down by then."""
    clock = FakeClock()
    budget = Budget(125.0, clock=clock)
    tr = FakeTrainer(total_steps=10**6, budget=budget)
    lrs = drive(tr, PlateauStop(0.2), plateau_after(10), clock=clock, dt=lambda step: 0.125 if step < 300 else 2.5)
    assert budget.progress() >= 1 and tr.step < 360 and plateau_record(tr) is None
    assert tr.scheduler.get_lr() == pytest.approx(MIN_LR, abs=1e-12)
    # Each step of the cool-down is as far along as the later of its step count and the budget's clock.
    lr0 = onecycle(300)
    for k, lr in enumerate(lrs[300:]):
        frac = max(k / 60, ((300 * 0.125 + k * 2.5) / 125.0 - 0.3) / (1 - 0.3))
        assert lr == pytest.approx(MIN_LR + 0.5 * (lr0 - MIN_LR) * (1 + math.cos(math.pi * min(frac, 1.0))), rel=1e-9)


def test_schedule_state_resumes_mid_cool_down():
    tr = FakeTrainer()
    drive(tr, PlateauStop(0.2), plateau_after(10)[:30])  # stops right after finding the plateau
    state = tr.scheduler.state_dict()
    assert state["plateau"]["found_step"] == 300 and state["plateau"]["tail_steps"] == 60
    expected = [tr.scheduler.get_lr()]
    for _ in range(20):
        tr.scheduler.step()
        expected.append(tr.scheduler.get_lr())
    again = FakeTrainer()
    again.scheduler.load_state_dict(state)
    got = [again.scheduler.get_lr()]
    for _ in range(20):
        again.scheduler.step()
        got.append(again.scheduler.get_lr())
    assert got == expected and again.scheduler.plateau == tr.scheduler.plateau
    assert got[-1] == pytest.approx(cool_down(onecycle(300), 20, 60), rel=1e-12)


def test_schedule_state_without_plateau_loads():
    """A checkpoint written before the plateau stop existed has no ``plateau`` in its schedule state."""
    tr = FakeTrainer()
    tr.scheduler.load_state_dict({"step_count": 10, "warmup_end": None})
    assert tr.scheduler.plateau.found_step is None
    assert tr.scheduler.get_lr() == pytest.approx(onecycle(10))


@pytest.mark.parametrize("patience", [0, -0.1, 1.5])
def test_bad_patience_is_a_config_error(patience):
    with pytest.raises(ConfigError, match="plateau_patience"):
        PlateauStop(patience)


def test_bad_min_val_is_a_config_error():
    with pytest.raises(ConfigError, match="plateau_min_val"):
        PlateauStop(0.2, min_val=-1)


# ---- the trainer: the stop, summary.json's record, and an exact resume mid-cool-down ----------------


class _Script(Evaluator):
    """Reports the objective's next scripted accuracy at each evaluation."""

    primary, higher_is_better = "acc1", True

    def __init__(self, objective):
        self.objective = objective

    def update(self, batch, outputs) -> None:
        pass

    def compute(self) -> dict[str, float]:
        i = int(self.objective.evals)
        self.objective.evals += 1
        return {"acc1": self.objective.script[min(i, len(self.objective.script) - 1)]}


class ScriptedSupervised(Supervised):
    """Trains the toy net; its validation accuracy follows a script. The evaluation count is a buffer,
    so a checkpoint keeps it and a resumed run reads the script where the interrupted one was."""

    def __init__(self, script):
        super().__init__(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), num_classes=3,
                         label_smoothing=0.0)
        self.script = script
        self.register_buffer("evals", torch.zeros(1, dtype=torch.long))

    def evaluator(self):
        return _Script(self)


# Epoch e ends at step 8e (64 samples, batch 8) of 160: best after epoch 3 (15% of the run), found
# after epoch 5 (25%, patience 10%), then 8 steps (20% of 40) of cool-down: the run stops at step 48.
SCRIPT = [0.5, 0.6, 0.7] + [0.7] * 30


def _trainer(out, hooks=()):
    torch.manual_seed(0)
    return make_trainer(out, epochs=20, objective=ScriptedSupervised(SCRIPT), sched={"name": "onecycle"},
                        ckpt_every_steps=4, hooks=[PlateauStop(0.1, min_val=32), *hooks])


def test_trainer_stops_and_resumes_bitwise_mid_cool_down(tmp_path):
    full = _trainer(tmp_path / "full")
    full.summary_extra = lambda: {"plateau_stop": plateau_record(full)}
    summary = full.fit()
    assert summary["stopped"] == "stopped_by_hook" and summary["steps"] == 48
    rec = summary["plateau_stop"]
    assert (rec["found_at_step"], rec["at_step"], rec["reanneal_steps"], rec["best_at_step"]) == (40, 48, 8, 24)
    assert rec["saved_s"] > 0

    with pytest.raises(Crash):
        _trainer(tmp_path / "run", hooks=[CrashAt(44)]).fit()
    assert find_latest(tmp_path / "run").name == "step_000040"  # found the plateau, then checkpointed
    resumed = _trainer(tmp_path / "run")
    resumed.fit(resume=True)
    assert_same_run(full, resumed)
    assert resumed.scheduler.get_lr() == full.scheduler.get_lr()
    got = plateau_record(resumed)
    assert {k: got[k] for k in ("at_step", "found_at_step", "reanneal_steps", "best", "best_at_step")} == \
        {k: rec[k] for k in ("at_step", "found_at_step", "reanneal_steps", "best", "best_at_step")}
