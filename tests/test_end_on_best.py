"""``engine.end_on_best``: a run whose validation metric peaked before its last step ends on the weights
of that evaluation (bitwise those the evaluator scored), re-evaluated for the summary; the checkpoints
stay as they were, so a resume continues from the last step."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from helpers import make_trainer

from vitkit.cli.train import format_summary
from vitkit.engine import find_latest

EPOCHS = 5


def _scripted(tr, scores: list[float]) -> list[tuple[int, dict]]:
    """Replace ``tr.evaluate`` with one that returns the next of ``scores`` and records the step and
    a copy of the weights it was called on."""
    seen, it = [], iter(scores)

    def evaluate(use_ema: bool = False) -> dict:
        seen.append((tr.step, {k: v.detach().clone() for k, v in tr.objective.model.state_dict().items()}))
        return {"acc1": next(it)}

    tr.evaluate = evaluate
    tr.last_evaluator = SimpleNamespace(primary="acc1", higher_is_better=True)
    return seen


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_run_ends_on_its_best_evaluation(tmp_path):
    tr = make_trainer(tmp_path, epochs=EPOCHS, end_on_best=True)
    seen = _scripted(tr, [0.2, 0.9, 0.5, 0.4, 0.3, 0.9])  # five evaluations, then the re-evaluation
    summary = tr.fit()
    assert len(seen) == EPOCHS + 1
    best_step, best_weights = seen[1]
    last_step, last_weights = seen[EPOCHS - 1]
    assert best_step < last_step == tr.step and not _same(best_weights, last_weights)
    now = tr.objective.model.state_dict()
    assert _same(now, best_weights)  # the weights the run keeps are those scored 0.9
    assert _same(seen[-1][1], best_weights)  # and the summary's evaluation was of them
    assert summary["ended_on_best"] == {"step": best_step, "metric": "acc1", "value": 0.9,
                                        "final_step": last_step, "final_value": 0.3}
    assert summary["val_acc"] == 0.9 and summary["steps"] == last_step
    assert find_latest(tmp_path).name == f"step_{last_step:06d}"  # a resume goes on from the last step
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "end_on_best"] == [best_step]
    line = format_summary({**summary, "out_dir": str(tmp_path)}, "data")
    assert f"kept the weights of step {best_step}, the best on validation" in line and "acc1 0.3" in line


def test_without_the_key_or_when_the_last_is_best_the_last_weights_stay(tmp_path):
    for name, scores, end in (("off", [0.2, 0.9, 0.5, 0.4, 0.3], False), ("last", [0.1, 0.2, 0.3, 0.4, 0.5], True)):
        tr = make_trainer(tmp_path / name, epochs=EPOCHS, end_on_best=end)
        seen = _scripted(tr, scores)
        summary = tr.fit()
        assert len(seen) == EPOCHS and "ended_on_best" not in summary, name
        assert _same(tr.objective.model.state_dict(), seen[-1][1]) and seen[-1][0] == tr.step, name
        assert summary["val_acc"] == scores[-1], name
