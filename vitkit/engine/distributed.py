"""Multi-process plumbing under torchrun: process groups, DDP/FSDP wrapping, collectives, agreed errors."""

from __future__ import annotations

import gc
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import TrainingError


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's RANK, WORLD_SIZE and LOCAL_RANK.

    Without those variables (a plain ``python`` run) this is a no-op returning rank 0 of 1.
    The backend is nccl when CUDA is available, else gloo. Calling it again is harmless.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if dist.is_available() and dist.is_initialized():
            return DistInfo(dist.get_rank(), dist.get_world_size(), dist.get_rank())
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if info.world_size > 1 and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return info


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def shutdown_distributed(wait: bool = True) -> None:
    """Leave the process group.

    Drop every reference to the trainer (and so its DDP wrapper) before calling this: a DDP
    module still alive when the group is destroyed makes gloo abort the process at exit now
    and then ("terminate called without an active exception"); collecting garbage here frees
    wrappers kept alive only by reference cycles. With ``wait`` (a run that ended normally)
    all ranks meet at a barrier first, so none tears down while another is still finishing.
    After an error, pass ``wait=False``: the other ranks may never come.
    """
    if is_dist():
        gc.collect()
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def group_device() -> torch.device:
    """The device collectives run on: the current CUDA device under NCCL, else the CPU."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over processes (no-op when single-process); returns the sum on ``t``'s device.

    The reduction runs on the process group's device (NCCL rejects CPU tensors), so a tensor
    on another device is moved there and back; a tensor already there is reduced in place.
    """
    if not is_dist():
        return t
    dev = group_device()
    if t.device == dev:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t
    moved = t.to(dev)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    t.copy_(moved)
    return t


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        # Each rank's loss depends on every rank's slice: the gradient of this rank's slice is
        # the sum of what every rank's loss sends back to it (a reduce-scatter of the grads).
        g = torch.stack(grads)  # (world, *x.shape)
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g[dist.get_rank()]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every process along dim 0 -> (world * B, ...), rank order.

    Gradients flow back to each rank's own slice (summed over the ranks' losses), which is what
    contrastive losses over the global batch need; ``x`` must have the same shape on every rank.
    Single-process: returns ``x``.
    """
    if not is_dist():
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


class RankFailedError(TrainingError):
    """Another process of the run failed; this one stopped with that process's message."""


def agree_on_failure(error: BaseException | None) -> None:
    """A collective point where every rank says whether it failed; all ranks must call it.

    When no rank failed this returns. When some did, every rank raises: the failed rank re-raises
    its own ``error``, the others raise :class:`RankFailedError` with the lowest failed rank's
    message, so no process is left waiting in a collective that will never come.
    """
    if not is_dist():
        if error is not None:
            raise error
        return
    flag = torch.zeros(get_world_size(), device=group_device())
    if error is not None:
        flag[get_rank()] = 1.0
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    failed = flag.nonzero().flatten().tolist()
    if not failed:
        return
    src = failed[0]
    box = [f"{type(error).__name__}: {error}" if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    if error is not None:
        raise error
    raise RankFailedError(f"rank {src} failed: {box[0]}")


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` as a list indexed by rank."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(objective: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap the objective in DistributedDataParallel.

    DDP synchronises gradients only of parameters with ``requires_grad``, so frozen state
    (EMA teacher) stays local and is updated identically on every rank by ``on_step_end``.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    return DDP(objective, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def wrap_fsdp(objective: nn.Module, device: torch.device) -> nn.Module:
    """Shard the objective's model with FSDP2 ``fully_shard`` (per transformer block, then whole).

    Sharding applies to ``objective.model``'s ``block_modules()`` (if any) and the objective itself, so the
    engine's calls stay ``objective(batch)``. Requires an initialised process group.
    """
    if not is_dist():
        raise RuntimeError("fsdp=True needs a multi-process run: launch with torchrun --nproc_per_node N")
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:
        raise RuntimeError("fsdp=True needs torch.distributed.fsdp.fully_shard (torch >= 2.6)") from e
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (get_world_size(),))
    model = getattr(objective, "model", None)
    # The model names its repeated blocks (ViT: blocks; Swin, PVT: the blocks of every stage).
    blocks = model.block_modules() if callable(getattr(model, "block_modules", None)) else ()
    for block in blocks:
        fully_shard(block, mesh=mesh)
    # The model is its own unit because objective.evaluate calls it directly, not via forward.
    if isinstance(model, nn.Module):
        fully_shard(model, mesh=mesh)
    fully_shard(objective, mesh=mesh)
    return objective


def fsdp_full_state(objective: nn.Module, optimizer) -> tuple[dict, dict]:
    """Unsharded objective and optimizer state dicts on CPU (complete on rank 0); collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(objective, options=opts), get_optimizer_state_dict(objective, optimizer, options=opts)


def fsdp_load_full_state(objective: nn.Module, optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load full state dicts (as :func:`fsdp_full_state` returns them) into a sharded objective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(objective, model_sd, options=opts)
    set_optimizer_state_dict(objective, optimizer, optim_sd, options=opts)


def no_sync(module: nn.Module, active: bool):
    """DDP's ``no_sync`` during non-final accumulation micro-steps; a null context otherwise."""
    fn = getattr(module, "no_sync", None)
    return fn() if active and fn is not None else nullcontext()
