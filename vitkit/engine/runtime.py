"""Runtime plumbing of the loop: seeding, device and autocast choice, moving (one batch ahead on
CUDA) and sizing batches, and compiling the training step."""

from __future__ import annotations

import random
from contextlib import nullcontext

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, TrainingError


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_has_native_bf16() -> bool:
    """True when this CPU executes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if torch.backends.cpu.get_cpu_capability().startswith("AMX"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# The one precision vocabulary: name -> autocast dtype (None: full precision). The engine's
# config also says "none" for fp32, and "auto" for bf16 where the hardware runs it natively.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for precision ``amp`` on ``device`` (None = full precision).

    ``amp`` is a name of :data:`PRECISIONS`, ``none`` (= ``fp32``) or ``auto`` (bf16 where the
    hardware runs it natively, else full precision).
    """
    amp = "fp32" if amp.lower() == "none" else amp.lower()
    if amp in PRECISIONS:
        return PRECISIONS[amp]
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    raise ValueError(f"unknown amp {amp!r}: use 'bf16', 'fp16', 'fp32' (or 'none') or 'auto'")


def map_tensors(batch, fn):
    """``fn`` applied to every tensor of a nested dict/list/tuple batch; other values pass through."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def to_device(batch, device: torch.device):
    """Move tensors in nested dicts/lists/tuples to ``device``; other values pass through."""
    return map_tensors(batch, lambda t: t.to(device, non_blocking=device.type == "cuda"))


def channels_last(batch):
    """4-D tensors of a nested batch in channels-last memory format."""
    return map_tensors(batch, lambda t: t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t)


def _pinned(t: Tensor) -> Tensor:
    return t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t


class CudaPrefetcher:
    """Iterates ``batches`` one ahead on a CUDA ``device``: while a step runs, the next batch is
    pinned (unless the loader pinned it) and copied on a side stream, so the copy overlaps the
    step. Only the copy runs ahead: the batch transform still runs when the batch is used, so
    the random draws come in the same order as without prefetching. An error from the loader is
    raised when the batch it failed to produce is asked for.
    """

    def __init__(self, batches, device: torch.device):
        self.batches, self.device = iter(batches), device
        self.stream = torch.cuda.Stream(device)
        self._fetch()

    def _fetch(self) -> None:
        self.error: Exception | None = None
        batch = None
        try:
            batch = next(self.batches, None)
            if batch is not None:
                with torch.cuda.stream(self.stream):
                    batch = map_tensors(batch, lambda t: _pinned(t).to(self.device, non_blocking=True))
        except Exception as e:
            batch, self.error = None, e
        self.ahead = batch

    def __iter__(self):
        return self

    def __next__(self):
        if self.error is not None:
            raise self.error
        batch = self.ahead
        if batch is None:
            raise StopIteration
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        # Memory the side stream allocated is in use on this stream until the step is done with it.
        map_tensors(batch, lambda t: t.record_stream(current) if t.is_cuda else None)
        self._fetch()
        return batch


def prefetch(batches, device: torch.device):
    """``batches`` with the next one copied ahead on CUDA (:class:`CudaPrefetcher`); as they are elsewhere."""
    return CudaPrefetcher(batches, device) if device.type == "cuda" else batches


def prepare_batch(batch, device: torch.device, transform=None, to_channels_last: bool = False):
    """``batch`` on ``device``, through ``transform`` (``batch -> batch``), 4-D tensors channels-last if asked."""
    batch = to_device(batch, device)
    if transform is not None:
        batch = transform(batch)
    return channels_last(batch) if to_channels_last else batch


def batch_size(batch) -> int:
    """Samples in a batch: the leading dim of its first tensor (first view for multi-view)."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.ndim else 1
    if isinstance(batch, dict):
        for v in batch.values():
            n = batch_size(v)
            if n:
                return n
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size(batch[0])
    return 0


def loader_batch_size(loader) -> int | None:
    bs = getattr(loader, "batch_size", None)
    if bs is None:
        bs = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return bs


def resolve_device(want: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The one device rule: ``auto`` (or None) -> CUDA when available else CPU; ``cuda`` without
    CUDA raises TrainingError; anything else (``cpu``, ``cuda:1``, a torch.device) as given."""
    if want is None or want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("device=cuda but CUDA is not available on this machine: use device=cpu or device=auto")
        return torch.device("cuda", local_rank)
    return torch.device(want)


def autocast(precision: torch.dtype | str | None, device: torch.device):
    """Autocast to ``precision`` (a dtype from :func:`resolve_amp`, or its name) on ``device``;
    a null context for full precision."""
    dtype = resolve_amp(precision, device) if isinstance(precision, str) else precision
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def compile_mode(compile: bool | None, cuda_graphs: bool, device: torch.device) -> str | None:
    """The torch.compile mode the settings ask for on ``device``: None (eager), ``"default"``, or
    ``"reduce-overhead"`` (CUDA graphs). ``compile`` None means on CUDA and off on a CPU."""
    if cuda_graphs:
        if device.type != "cuda":
            raise ConfigError(f"engine.cuda_graphs=true needs a CUDA device and this run is on {device}: "
                              "set engine.cuda_graphs=false")
        if compile is False:
            raise ConfigError("engine.cuda_graphs=true replays the compiled step: set engine.compile=true "
                              "(or leave it unset), or engine.cuda_graphs=false")
        return "reduce-overhead"
    on = device.type == "cuda" if compile is None else bool(compile)
    return "default" if on else None


def _is_compile_error(e: BaseException) -> bool:
    return any(c.__module__.startswith(("torch._dynamo", "torch._inductor")) for c in type(e).__mro__)


class CompiledStep:
    """``module`` (the training forward) through ``torch.compile`` in ``mode``.

    If compiling fails (no compiler, an unsupported operation), ``say`` reports it once and the
    run goes on with ``module`` itself; other errors are raised as they are. Under
    ``"reduce-overhead"`` the step is replayed as a CUDA graph, which needs every batch the same
    shape (the train loader drops the last partial batch) and overwrites its outputs at the next
    replay: they are returned as copies (the loss keeps its gradient).
    """

    def __init__(self, module, mode: str, say):
        self.module, self.mode, self.say = module, mode, say
        self.compiled = torch.compile(module, mode=mode, dynamic=False if mode == "reduce-overhead" else None)

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.module(*args, **kwargs)
        try:
            if self.mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
                return map_tensors(self.compiled(*args, **kwargs), torch.clone)
            return self.compiled(*args, **kwargs)
        except Exception as e:
            if not _is_compile_error(e):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.say(f"torch.compile failed ({type(e).__name__}: {first[:200]}): training without it")
            self.compiled = None
            return self.module(*args, **kwargs)


def compile_step(module, mode: str | None, say):
    """``module``, or a :class:`CompiledStep` of it when ``mode`` (from :func:`compile_mode`) is set."""
    return module if mode is None else CompiledStep(module, mode, say)
