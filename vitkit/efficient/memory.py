"""Peak memory of one forward pass: CUDA's allocator statistics, or live tensor bytes on the CPU."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of storages that ops create while active, freed when their last tensor dies."""

    def __init__(self, external: set[int]):
        super().__init__()
        self.external = external  # storages that existed before (weights, the input): not counted
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.external or storage.nbytes() == 0:
                continue
            if key not in self.refs:
                self.refs[key] = 0
                self.sizes[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


def peak_forward_bytes(model: torch.nn.Module, x: torch.Tensor, fn: Callable[[torch.Tensor], object]) -> int:
    """Peak bytes held while ``fn(x)`` runs (one forward of ``model``), weights included.

    On CUDA this is the allocator's peak; on the CPU the peak of live tensor storages created
    by the ops plus the model's weights (kernels' private scratch space is not seen).
    """
    device = x.device
    weights = sum(t.untyped_storage().nbytes() for t in list(model.parameters()) + list(model.buffers()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn(x)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    external = {t.untyped_storage().data_ptr() for t in [x, *model.parameters(), *model.buffers()]}
    mode = _LiveTensorBytes(external)
    with mode:
        fn(x)
    return weights + mode.peak
