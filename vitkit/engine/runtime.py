"""Runtime plumbing of the loop: seeding, device and autocast choice, moving and sizing batches."""

from __future__ import annotations

import random
from contextlib import nullcontext

import numpy as np
import torch
from torch import Tensor

from ..errors import TrainingError


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


def to_device(batch, device: torch.device):
    """Move tensors in nested dicts/lists/tuples to ``device``; other values pass through."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def channels_last(batch):
    """4-D tensors of a nested batch in channels-last memory format."""
    if isinstance(batch, Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.ndim == 4 else batch
    if isinstance(batch, dict):
        return {k: channels_last(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(channels_last(v) for v in batch)
    return batch


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
