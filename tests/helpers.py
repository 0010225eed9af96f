"""Helpers shared by the test modules (which never import each other).

Tiny data, a resumable sampler and tiny models for the engine; crash-then-resume; peers that a
test needs (a failure in CI, a skip with the real reason elsewhere); the `vitkit` command in a
subprocess; parity perturbation.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import traceback

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vitkit._peers import import_peer
from vitkit.engine import EngineConfig, OptimConfig, ScheduleConfig, Trainer, find_latest
from vitkit.objectives import Supervised


class ToyDataset(Dataset):
    """``n`` samples of 8 features whose label (of 3) is a fixed linear function of them."""

    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        w = torch.randn(8, 3, generator=torch.Generator().manual_seed(123))
        self.y = (self.x @ w).argmax(-1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i], "skipped": torch.tensor(False)}


class ResumableSampler:
    """Shuffles by (seed, epoch), shards by rank, resumes from ``position`` samples into the epoch."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch = 0
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return order[self.rank :: self.world]

    def __len__(self) -> int:
        return len(self._indices())

    def __iter__(self):
        idx = self._indices()
        start, self.position = self.position, 0
        yield from idx[start:]


class TinyNet(nn.Module):
    """A 2-layer MLP with the backbone API bits the engine uses."""

    def __init__(self, dim: int = 8, hidden: int = 16, num_classes: int = 3, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def noise_transform(batch: dict) -> dict:
    """A random on-device augmentation, so resume must restore the RNG stream to match."""
    return {**batch, "image": batch["image"] + 0.01 * torch.randn_like(batch["image"])}


def make_trainer(
    out_dir,
    *,
    n: int = 64,
    batch_size: int = 8,
    shuffle: bool = True,
    drop: float = 0.1,
    objective=None,
    hooks=(),
    optim: dict | None = None,
    sched: dict | None = None,
    rank: int = 0,
    world: int = 1,
    transform=noise_transform,
    dataset=None,
    val_dataset=None,
    **engine,
) -> Trainer:
    torch.manual_seed(0)
    ds = dataset if dataset is not None else ToyDataset(n)
    sampler = ResumableSampler(len(ds), rank=rank, world=world, shuffle=shuffle)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True)
    val = DataLoader(val_dataset if val_dataset is not None else ToyDataset(32, seed=1), batch_size=16)
    if objective is None:
        objective = Supervised(TinyNet(drop=drop), num_classes=3, label_smoothing=0.0)
    cfg = EngineConfig(**{"epochs": 2, "amp": "none", "log_every": 2, "tensorboard": False, "plots": False, **engine})
    ocfg = OptimConfig(**{"lr": 1e-2, "scale_lr": False, **(optim or {})})
    scfg = ScheduleConfig(**{"warmup_steps": 2, "min_lr": 1e-4, **(sched or {})})
    return Trainer(
        objective, loader, val, cfg=cfg, optim_cfg=ocfg, sched_cfg=scfg, out_dir=out_dir,
        train_transform=transform, sampler=sampler, hooks=hooks,
    )


def assert_same_state(a: dict, b: dict, path: str = "") -> None:
    """Bitwise equality of nested state dicts (tensors via torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"differs at {path}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {path}: {set(a) ^ set(b)}"
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"length differs at {path}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"differs at {path}: {a} != {b}"


class Crash(Exception):
    """Simulated kill of the training process."""


class CrashAt:
    """Hook raising :class:`Crash` right after optimizer step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, ctx):
        if ctx.step == self.step:
            raise Crash(ctx.step)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, world: int, port: int, out_dir: str, engine: dict) -> None:
    """One process of a gloo run: trains, and rank 0 saves the final objective state."""
    from vitkit.engine.distributed import shutdown_distributed

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        tr = make_trainer(out_dir, rank=rank, world=world, **engine)
        summary = tr.fit()
        if rank == 0:
            torch.save({"objective": tr.objective.state_dict(), "summary": summary}, f"{out_dir}/final.pt")
        del tr  # release the DDP wrapper before the process group goes
    except BaseException:
        shutdown_distributed(wait=False)
        raise
    shutdown_distributed()


def crash_and_resume(make, out, crash_step: int, *, latest: int | None = None, **kw) -> Trainer:
    """Train ``make(out, hooks=[CrashAt(crash_step)], **kw)`` until the simulated kill after step
    ``crash_step``, then resume a fresh ``make(out, **kw)`` to the end; returns that trainer.

    ``latest`` is the step of the checkpoint the resume must start from.
    """
    with pytest.raises(Crash):
        make(out, hooks=[CrashAt(crash_step)], **kw).fit()
    if latest is not None:
        assert find_latest(out).name == f"step_{latest:06d}"
    resumed = make(out, **kw)
    resumed.fit(resume=True)
    return resumed


def assert_same_run(full: Trainer, resumed: Trainer, *, optimizer: bool = True, ema: bool = False) -> None:
    """A resumed run ends bitwise where the uninterrupted one did."""
    assert resumed.step == full.step
    assert_same_state(full.objective.state_dict(), resumed.objective.state_dict(), "objective")
    if optimizer:
        assert_same_state(full.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")
    if ema:
        assert_same_state(full.ema.module.state_dict(), resumed.ema.module.state_dict(), "ema")


# ---- peers -----------------------------------------------------------------------------------------

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_peer(name: str):
    """The peer module ``name`` for the test that needs it.

    In CI every peer must import: a missing or broken one fails the test with the real error.
    Elsewhere the test skips, giving that error as the reason.
    """
    try:
        module = import_peer(name)
    except ImportError as e:
        cause = e.__cause__ or e
        where = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__)[-3:])
        reason = f"{e}\n{where}"
    else:
        if module is not None:
            return module
        reason = f"{name} is not installed (pip install -e '.[dev]')"
    if IN_CI:
        pytest.fail(f"CI needs every peer: {reason}", pytrace=False)
    pytest.skip(reason)


class lazy_peer:  # noqa: N801  (stands in for a module name)
    """A module-level stand-in for ``require_peer(name)``: imports on first attribute access, inside a test."""

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attr: str):
        if attr.startswith("__"):  # collection asks objects for __test__ and the like: not the peer's business
            raise AttributeError(attr)
        return getattr(require_peer(self._name), attr)

    def __setattr__(self, attr: str, value) -> None:
        # monkeypatch restores through the target's __dict__, which the stand-in does not share.
        raise TypeError(f"patch the module itself: monkeypatch.setattr(require_peer({self._name!r}), {attr!r}, ...)")


# ---- the `vitkit` command --------------------------------------------------------------------------


def run_vitkit(*args, env: dict | None = None, cwd=None, check: bool = False, timeout: float = 300):
    """Run the installed ``vitkit`` command (this checkout's, through PYTHONPATH) offline, 1 thread.

    Returns the completed process (text stdout and stderr); ``check`` asserts exit code 0.
    """
    exe = shutil.which("vitkit")
    cmd = [exe] if exe else [sys.executable, "-m", "vitkit.cli.main"]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    r = subprocess.run(
        [*cmd, *map(str, args)], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout
    )
    if check:
        assert r.returncode == 0, f"vitkit {' '.join(map(str, args))} exited {r.returncode}:\n{r.stderr[-4000:]}"
    return r


def assert_user_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, a `vitkit <cmd>: error:` line containing every needle, and no traceback."""
    err = r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err and "Traceback" not in r.stdout, err
    line = next((ln for ln in err.splitlines() if ": error: " in ln), "")
    assert line.startswith("vitkit "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def write_class_folder(root, classes=("a", "b", "c"), per_class: int = 20, size: int = 24, seed: int = 0) -> None:
    """A small, separable class folder of PNGs: each class a colour and a stripe direction, with noise."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = torch.rand(size, size, 3, generator=g) * 60
            img[..., k % 3] += 120
            stripes = (torch.arange(size) // 3 % 2).float() * 60
            img += stripes[:, None, None] if k % 2 else stripes[None, :, None]
            Image.fromarray(img.clamp(0, 255).to(torch.uint8).numpy()).save(root / name / f"{i}.png")


# ---- parity ----------------------------------------------------------------------------------------


def perturb(module: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Perturb every parameter and BatchNorm statistic deterministically, so that each one changes
    the output and parity is never checked on zero or identity initialisation; returns it in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * scale)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return module.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of two same-shaped tensors (printed, for the failure report)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a - b).abs().max().item()
    print(f"max |diff| = {diff:.3g}")
    return diff


# ---------------------------------------------------------------- browser tests (the demos)


def _chromium() -> str | None:
    if os.environ.get("VITKIT_CHROMIUM"):
        return os.environ["VITKIT_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


CHROMIUM = _chromium()
_NO_CHROMIUM = (
    "no Chromium executable on this machine (apt-get install chromium, or set VITKIT_CHROMIUM); "
    ".ci/run installs it where apt-get can"
)


@contextlib.contextmanager
def demo_page(source: str):
    """``vitkit demo`` of ``source`` served on a free loopback port, opened in headless Chromium; yields the
    page once its upload input is there, and closes the browser and the server afterwards."""
    from vitkit.interpret.demo import launch_demo

    sync_playwright = require_browser()
    port = free_port()
    demo = launch_demo(source, port=port, block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
            )
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            # Not "networkidle": the page may ask for web fonts that a machine offline never gets.
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded", timeout=90_000)
            page.locator("#input-image input[type=file]").wait_for(state="attached", timeout=90_000)
            yield page
            browser.close()
    finally:
        demo.close()


def require_browser():
    """Playwright's ``sync_playwright`` for a browser test: Chromium, gradio and playwright present, or the
    test skips (fails in CI, where they must be)."""
    if CHROMIUM is None and IN_CI:
        pytest.fail(_NO_CHROMIUM, pytrace=False)
    if CHROMIUM is None:
        pytest.skip(_NO_CHROMIUM)
    require_peer("gradio")
    return require_peer("playwright.sync_api").sync_playwright


# A demo's output image (#map) is done when its status tracker is hidden and its <img> holds a served
# file that loaded.
_MAP_READY = """prev => {
    const tracker = document.querySelector('#map [data-testid="status-tracker"]');
    const img = document.querySelector('#map img');
    return tracker && tracker.classList.contains('hide') && img && img.complete && img.naturalWidth > 0
        && img.src.includes('file=') && img.src !== prev;
}"""


def wait_for_map(page, previous: str) -> str:
    """Wait until the demo's #map image is a new loaded file (not ``previous``); returns its src."""
    page.wait_for_function(_MAP_READY, arg=previous, timeout=90_000)
    return page.locator("#map img").get_attribute("src")

