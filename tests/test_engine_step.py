"""The engine's step without host synchronisation: losses checked and counted on the device, a
non-finite step dropped by the fused optimizer, the next batch copied ahead, compile modes.

Every path here is the one a CUDA run takes; on a CPU the tests switch it on by hand
(``trainer.tally.deferred = True``) and compare with torch's own optimizer or a hand count.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TinyNet, ToyDataset, assert_same_run, crash_and_resume, make_trainer
from torch.utils.data import DataLoader

from vitkit.engine import EngineConfig, NonFiniteLossError, Trainer, find_latest, runtime
from vitkit.engine.distributed import DistInfo
from vitkit.engine.optim import StepTally, optimizer_step, skips_on_device
from vitkit.engine.setup import defers_checks
from vitkit.errors import ConfigError
from vitkit.objectives import Supervised


def deferred(tr: Trainer) -> Trainer:
    """``tr`` with the device-side checks a CUDA run uses (the fused CPU AdamW drops steps the same way)."""
    assert skips_on_device(tr.optimizer), "torch's fused AdamW on CPU is needed to drop a step on the device"
    tr.tally.deferred = True
    return tr


def make_deferred(out, **kw) -> Trainer:
    return deferred(make_trainer(out, **kw))


class Faulty(ToyDataset):
    """ToyDataset with NaN features in samples ``nan_rows`` (the loss of their batch is NaN), and
    every 16th sample marked as standing in for a broken file."""

    def __init__(self, n: int = 64, nan_rows: tuple[int, ...] = ()):
        super().__init__(n)
        self.nan_rows = set(nan_rows)

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        if i in self.nan_rows:
            item["image"] = item["image"] * float("nan")
        return {**item, "skipped": torch.tensor(i % 16 == 0)}


def supervised() -> Supervised:
    return Supervised(TinyNet(), num_classes=3)


def test_deferred_skip_drops_exactly_the_nonfinite_steps(tmp_path):
    """NaN losses at steps 2 and 5 under nonfinite=skip: the weights equal torch's AdamW stepping on
    the other 6 batches only, and the counts (steps, files) reach the summary."""
    data = Faulty(64, nan_rows=(8, 32))  # batches of 8 in order: rows 8 and 32 are in batches 2 and 5
    common = dict(epochs=1, shuffle=False, transform=None, nonfinite="skip",
                  sched={"name": "constant", "warmup_steps": 0}, dataset=data)
    torch.manual_seed(0)
    tr = make_deferred(tmp_path / "run", objective=supervised(), **common)
    summary = tr.fit()
    assert summary["steps"] == 8 and summary["nonfinite_skipped"] == 2
    assert summary["skipped_files"] == sum(i % 16 == 0 for i in range(64)) == 4

    torch.manual_seed(0)
    ref = supervised()  # the same initial weights
    decay = [p for p in ref.parameters() if p.ndim > 1]
    no_decay = [p for p in ref.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, weight_decay=0.05, fused=True)
    for step, batch in enumerate(DataLoader(data, batch_size=8), start=1):
        loss = ref(batch)["loss"]
        if step not in (2, 5):
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
    for (name, got), want in zip(tr.objective.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(got, want), name
    assert {float(s["step"]) for s in tr.optimizer.state.values()} == {6.0}


def test_deferred_stop_names_the_first_bad_step_and_checkpoints_nothing_after_it(tmp_path):
    """The NaN of step 3 is read at the log step 4: the error names step 3, the checkpoint of
    step 4 is never written, and the device never applied the NaN update."""
    tr = make_deferred(tmp_path, dataset=Faulty(64, nan_rows=(16,)), shuffle=False, log_every=4,
                       ckpt_every_steps=2)
    with pytest.raises(NonFiniteLossError, match="optimizer step 3") as info:
        tr.fit()
    assert info.value.step == 3 and math.isnan(info.value.value)
    assert find_latest(tmp_path).name == "step_000002"
    assert all(torch.isfinite(p).all() for p in tr.objective.parameters())


def test_deferred_resume_is_bitwise_identical(tmp_path):
    full = make_deferred(tmp_path / "full", epochs=2, ema_decay=0.9)
    full.fit()
    resumed = crash_and_resume(make_deferred, tmp_path / "run", 7, latest=4, epochs=2, ema_decay=0.9,
                               ckpt_every_steps=4)
    assert_same_run(full, resumed, ema=True)


class HostReads(torch.Tensor):
    """A tensor that records every read of its value by the host: what makes a CPU wait for a GPU."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__"}
    at: list[int] = []
    clock = staticmethod(lambda: -1)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in cls.READS:
            cls.at.append(cls.clock())
        return super().__torch_function__(func, types, args, kwargs or {})


class LossReads(Supervised):
    def __init__(self):
        super().__init__(TinyNet(), num_classes=3)

    def forward(self, batch):
        out = super().forward(batch)
        out["loss"] = out["loss"].as_subclass(HostReads)
        return out


@pytest.mark.parametrize("defer", [True, False], ids=["deferred", "host_checks"])
def test_the_loss_is_read_at_log_steps_only(tmp_path, defer):
    """Everything computed from the loss (the non-finite check, the optimizer's found_inf, the
    logged mean) is read by the host at log steps only; the host-check path reads every step."""
    tr = make_trainer(tmp_path, objective=LossReads(), epochs=1, log_every=4)
    if defer:
        deferred(tr)
    HostReads.at = []
    HostReads.clock = staticmethod(lambda: tr.state.step)
    tr.fit()
    if defer:
        assert set(HostReads.at) == {4, 8}
    else:
        assert set(range(8)) <= set(HostReads.at)  # step k's check happens before the count says k


def test_found_inf_leaves_weights_moments_and_step_count_untouched():
    """optimizer_step with found_inf=1 changes nothing; with 0 it is torch's plain fused step."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.1, fused=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.randn(5, 4)

    def grads(m):
        m(x).square().mean().backward()

    grads(a), grads(b)
    optimizer_step(opt_a, scaler, list(a.parameters()), None, found_inf=torch.zeros(()))
    opt_b.step()
    opt_b.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    moments = [{k: v.clone() for k, v in s.items()} for s in opt_a.state.values()]
    grads(a)
    optimizer_step(opt_a, scaler, list(a.parameters()), 1.0, found_inf=torch.ones(()))
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k]), k
    for s, m in zip(opt_a.state.values(), moments):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s[k], m[k]), k
    assert not hasattr(opt_a, "found_inf") and all(p.grad is None for p in a.parameters())


def test_which_runs_defer_their_checks():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    obj = Supervised(TinyNet(), num_classes=3)
    fused = torch.optim.AdamW(obj.parameters(), fused=True)
    sgd = torch.optim.SGD(obj.parameters(), lr=0.1, foreach=True)

    class Scaler:
        def __init__(self, on):
            self.on = on

        def is_enabled(self):
            return self.on

    class WithHook(Supervised):
        def on_step_end(self, ctx):
            pass

    one, two = DistInfo(), DistInfo(rank=0, world_size=2)
    assert defers_checks(cuda, one, Scaler(False), fused, "stop", obj, None)
    assert defers_checks(cuda, one, Scaler(False), fused, "skip", obj, None)
    assert not defers_checks(cpu, one, Scaler(False), fused, "stop", obj, None)  # reading costs no wait
    assert not defers_checks(cuda, two, Scaler(False), fused, "stop", obj, None)  # processes agree each step
    assert not defers_checks(cuda, one, Scaler(True), fused, "stop", obj, None)  # fp16 loss scaling
    assert not defers_checks(cuda, one, Scaler(False), sgd, "stop", obj, None)  # cannot drop a step itself
    assert defers_checks(cuda, one, Scaler(False), fused, "stop", obj, object())
    assert not defers_checks(cuda, one, Scaler(False), fused, "skip", obj, object())  # the EMA would see it
    hooked = WithHook(TinyNet(), num_classes=3)
    assert not defers_checks(cuda, one, Scaler(False), fused, "skip", hooked, None)
    assert StepTally(cpu, deferred=False).step_flag() is None


class FakeStream:
    def wait_stream(self, other):
        pass


def test_prefetcher_runs_one_batch_ahead_and_raises_errors_in_place(monkeypatch):
    """The CUDA prefetcher's order, look-ahead and errors, with the stream calls stubbed out."""
    from contextlib import nullcontext

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: FakeStream())
    monkeypatch.setattr(runtime, "_pinned", lambda t: t)
    pulled = []

    def source():
        for i in range(3):
            pulled.append(i)
            yield {"image": torch.full((2,), float(i)), "name": f"b{i}"}
        pulled.append("error")
        raise OSError("disk gone")

    it = runtime.CudaPrefetcher(source(), torch.device("cpu"))
    assert pulled == [0]
    for i in range(3):
        batch = next(it)
        assert batch["name"] == f"b{i}" and torch.equal(batch["image"], torch.full((2,), float(i)))
        assert pulled[-1] == (i + 1 if i < 2 else "error")  # the next one is already fetched
    with pytest.raises(OSError, match="disk gone"):
        next(it)
    assert runtime.prefetch([1, 2], torch.device("cpu")) == [1, 2]


def test_compile_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.compile_mode(None, False, cpu) is None
    assert runtime.compile_mode(None, False, cuda) == "default"
    assert runtime.compile_mode(True, False, cpu) == "default"
    assert runtime.compile_mode(False, False, cuda) is None
    assert runtime.compile_mode(None, True, cuda) == runtime.compile_mode(True, True, cuda) == "reduce-overhead"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        runtime.compile_mode(None, True, cpu)
    with pytest.raises(ConfigError, match="set engine.compile=true"):
        runtime.compile_mode(False, True, cuda)


def test_cuda_graphs_on_a_cpu_is_a_config_error(tmp_path):
    cfg = EngineConfig(amp="none", tensorboard=False, plots=False, device="cpu")
    cfg.cuda_graphs = True  # the key as the run config sets it
    loader = DataLoader(ToyDataset(16), batch_size=8)
    with pytest.raises(ConfigError, match="engine.cuda_graphs=true needs a CUDA device"):
        Trainer(Supervised(TinyNet(), num_classes=3), loader, cfg=cfg, out_dir=tmp_path)


def test_compile_failure_falls_back_to_the_module(monkeypatch):
    said, calls = [], []

    def broken_compile(module, **kw):
        calls.append(kw)

        def run(*a, **k):
            raise torch._dynamo.exc.TorchDynamoException("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = torch.nn.Linear(3, 2)
    step = runtime.compile_step(model, "default", said.append)
    x = torch.randn(4, 3)
    assert torch.equal(step(x), model(x)) and torch.equal(step(x), model(x))
    assert len(said) == 1 and "no C++ compiler found" in said[0] and "training without it" in said[0]
    assert calls == [{"mode": "default", "dynamic": None}]
    assert runtime.compile_step(model, None, said.append) is model


def test_other_errors_of_the_compiled_step_are_not_swallowed(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kw: lambda *a: {}["label"])
    step = runtime.compile_step(torch.nn.Linear(3, 2), "default", pytest.fail)
    with pytest.raises(KeyError):
        step(torch.randn(1, 3))


def test_cuda_graph_outputs_are_copies_that_keep_the_gradient(monkeypatch):
    """A replayed graph overwrites its outputs: the step hands out copies, marking each step."""
    marks = []
    w = torch.ones(3, requires_grad=True)
    static = {}

    def replay(x):
        static["loss"] = (w * x).sum()
        return {"loss": static["loss"], "acc1": torch.tensor(0.5)}

    monkeypatch.setattr(torch, "compile", lambda module, **kw: replay)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    step = runtime.compile_step(torch.nn.Identity(), "reduce-overhead", pytest.fail)
    out = step(torch.tensor([1.0, 2.0, 3.0]))
    assert marks == [1] and out["loss"].data_ptr() != static["loss"].data_ptr()
    out["loss"].backward()
    assert torch.equal(w.grad, torch.tensor([1.0, 2.0, 3.0])) and out["acc1"].item() == 0.5
