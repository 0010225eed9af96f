"""Optimizers and their step: weight-decay groups, layer-wise learning-rate decay, clipping, and
the tally that keeps non-finite steps out of the weights without reading the device each step."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable
from functools import partial
from itertools import chain

import torch
from torch import nn

from .config import OptimConfig
from .failures import AgreedFailure, NonFiniteLossError, finite_everywhere

# A group matcher suffix that merges a parameter into the group before it (timm's convention,
# used for the final norm of a ViT, which belongs with the last block).
MATCH_PREV_GROUP = (99999,)


def _find_matcher(module: nn.Module) -> tuple[dict | None, str]:
    """The backbone's ``group_matcher()`` and the name prefix of its parameters in ``module``."""
    if callable(getattr(module, "group_matcher", None)):
        return module.group_matcher(), ""
    inner = getattr(module, "model", None)
    if inner is not None and callable(getattr(inner, "group_matcher", None)):
        return inner.group_matcher(), "model."
    return None, ""


def layer_ids(names: Iterable[str], group_matcher: dict, prefix: str = "") -> tuple[dict[str, int], int]:
    """Assign each parameter name a layer id with a timm-format group matcher.

    The matcher maps group names to a regex or a list of ``(regex, suffix)``; a regex's captured
    numbers and the suffix form an ordinal, ordinals are sorted and renumbered 0..L-1, and a suffix
    of ``(99999,)`` joins the previous layer. Names that match nothing (classifier head, objective
    heads outside the backbone) go to one last layer.

    Returns:
        ``({name: layer_id}, num_layers)``.
    """
    compiled = []
    for ordinal, spec in enumerate(group_matcher.values()):
        if spec is None:
            continue
        if isinstance(spec, (list, tuple)):
            compiled += [(re.compile(rx), (ordinal,), suffix) for rx, suffix in spec]
        else:
            compiled.append((re.compile(spec), (ordinal,), None))

    def ordinal_of(name: str) -> tuple[float, ...]:
        if not name.startswith(prefix):
            return (math.inf,)
        local = name[len(prefix):]
        for rx, head, suffix in compiled:
            m = rx.match(local)
            if m:
                return tuple(map(float, chain.from_iterable(p for p in (head, m.groups(), suffix) if p)))
        return (math.inf,)

    by_ordinal: dict[tuple[float, ...], list[str]] = defaultdict(list)
    for n in names:
        by_ordinal[ordinal_of(n)].append(n)
    ids: dict[str, int] = {}
    lid = -1
    for key in sorted(by_ordinal):
        if lid < 0 or key[-1] != MATCH_PREV_GROUP[0]:
            lid += 1
        for n in by_ordinal[key]:
            ids[n] = lid
    return ids, lid + 1


def param_groups(
    module: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    no_weight_decay_names: Iterable[str] = (),
) -> list[dict]:
    """Split trainable parameters into optimizer groups.

    No weight decay for parameters with ndim <= 1 (norms, biases), for ``no_weight_decay_names``
    and for the names ``module.no_weight_decay()`` returns (an :class:`Objective` prefixes its
    model's names with ``model.``). With ``layer_decay``, each parameter gets a layer id from the
    backbone's ``group_matcher()`` (found on ``module`` or ``module.model``) and an
    ``lr_scale = layer_decay ** (num_layers - 1 - layer_id)``: the top layer (head) trains at the
    full lr, each layer below at ``layer_decay`` times the one above.

    Returns:
        list of dicts with ``params``, ``names``, ``weight_decay``, ``lr_scale``.
    """
    skip = set(no_weight_decay_names)
    if callable(getattr(module, "no_weight_decay", None)):
        skip |= set(module.no_weight_decay())
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    ids: dict[str, int] = {}
    num_layers = 1
    if layer_decay is not None:
        matcher, prefix = _find_matcher(module)
        if matcher is None:
            raise ValueError(
                "layer_decay needs the backbone to define group_matcher(); "
                f"{type(module).__name__} (and its .model) has none: set optim.layer_decay=null"
            )
        ids, num_layers = layer_ids([n for n, _ in named], matcher, prefix)

    groups: dict[tuple[int, bool], dict] = {}
    for name, p in named:
        no_decay = p.ndim <= 1 or name in skip
        lid = ids.get(name, num_layers - 1)
        key = (lid, no_decay)
        if key not in groups:
            scale = layer_decay ** (num_layers - 1 - lid) if layer_decay is not None else 1.0
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": scale,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The base learning rate for this run: linear scaling from a reference batch of 512."""
    return cfg.lr * global_batch / 512 if cfg.scale_lr else cfg.lr


def build_optimizer(objective: nn.Module, cfg: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    """AdamW (or SGD) over ``objective``'s trainable parameters, grouped by :func:`param_groups`.

    Each group's ``lr`` is set to ``base_lr * lr_scale``; the schedule rewrites it every step.
    """
    if cfg.clip_mode not in CLIP_MODES:
        raise ValueError(f"optim.clip_mode must be one of {CLIP_MODES}, got {cfg.clip_mode!r}")
    groups = param_groups(objective, cfg.weight_decay, cfg.layer_decay)
    if not groups:
        raise ValueError(f"{type(objective).__name__} has no parameters with requires_grad=True to train")
    lr = scaled_lr(cfg, global_batch)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    params = [p for g in groups for p in g["params"]]
    # The fused kernel is fastest where it exists (CUDA, and CPU float tensors in recent torch);
    # foreach is the portable fallback. Both give the same result run to run.
    fused = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
    name = cfg.name.lower()
    if name == "adamw":
        kw = dict(lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
        try:
            return torch.optim.AdamW(groups, fused=fused, **kw)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(groups, foreach=True, **kw)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
    raise ValueError(f"unknown optimizer {cfg.name!r}: use 'adamw' or 'sgd'")


CLIP_MODES = ("global", "per_param")


def clip_per_param_(params, max_norm: float) -> torch.Tensor:
    """Scale each parameter's gradient so that its own norm is at most ``max_norm`` (DINO's ``clip_gradients``).

    A gradient of norm n is multiplied by ``max_norm / (n + 1e-6)`` when that is below 1. Returns
    the norm of all gradients before clipping (what ``clip_grad_norm_`` reports), for the logs.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    for g, n in zip(grads, norms):
        coef = max_norm / (n + 1e-6)
        g.mul_(torch.where(coef < 1, coef, torch.ones_like(coef)))
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def optimizer_step(optimizer, scaler, params, clip_grad: float | None, clip_mode: str = "global",
                   found_inf: torch.Tensor | None = None):
    """Unscale and clip (when ``clip_grad``, by ``clip_mode``), step, update the loss scale, zero the gradients.

    ``found_inf``: a float32 scalar on the parameters' device; where it is 1 the (fused) optimizer
    leaves weights, moments and step counts as they were, decided on the device (see
    :class:`StepTally`). Returns the gradients' norm before clipping, or None without clipping.
    """
    grad_norm = None
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        if clip_mode == "per_param":
            grad_norm = clip_per_param_(params, clip_grad)
        elif clip_mode == "global":
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
        else:
            raise ValueError(f"optim.clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
    if found_inf is not None:
        # torch's fused Adam/AdamW/SGD read this attribute (GradScaler passes its own the same way).
        optimizer.found_inf = found_inf
    try:
        scaler.step(optimizer)
    finally:
        if found_inf is not None:
            del optimizer.found_inf
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` can drop a step on the device (torch's fused kernels take ``found_inf``)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups
    )


class StepTally:
    """What the loop counts per step, kept where the step runs: non-finite losses and skipped files.

    With ``deferred`` False every micro-batch's loss is checked on the host as it comes (free on a
    CPU, and what torch.distributed needs: every process must take the same branch at once).
    With ``deferred`` True nothing is read from the device per step: each loss is checked on the
    device, a step with a non-finite loss is dropped there by the fused optimizer (``found_inf``),
    and the counts reach the host at :meth:`read` (log steps, checkpoints, the end of an epoch).
    A non-finite loss then stops the run (``nonfinite="stop"``) at the next read, naming its
    step, before any checkpoint is written; under ``nonfinite="skip"`` the steps are counted.
    """

    def __init__(self, device: torch.device, deferred: bool, nonfinite: str = "stop"):
        self.device, self.deferred, self.nonfinite = device, deferred, nonfinite
        self._reset()

    def _reset(self) -> None:
        zero = partial(torch.zeros, (), device=self.device)
        self.steps = zero(dtype=torch.int64)  # steps since the last read
        self.bad_steps = zero(dtype=torch.int64)
        self.first_bad = zero(dtype=torch.int64)  # 1-based, among the steps since the last read
        self.first_value = zero(dtype=torch.float32)
        self.files = zero(dtype=torch.int64)
        self._ok: torch.Tensor | None = None  # this step's micro-batches so far: all finite
        self._value = zero(dtype=torch.float32)  # a non-finite loss of this step

    def add_files(self, skipped: torch.Tensor, state) -> None:
        """Count the files left out of a batch (``batch["skipped"]``)."""
        if self.deferred:
            self.files += skipped.sum()
        else:
            state.skipped_files += int(skipped.sum())

    def loss_is_bad(self, loss: torch.Tensor | None, error: BaseException | None, step: int, world_size: int) -> bool:
        """Whether a micro-batch's loss (of optimizer step ``step``) is non-finite, checked on the
        host; always False when deferred (the device keeps it). Raises :class:`NonFiniteLossError`
        under ``nonfinite="stop"``, and an error of the micro-batch as agreed."""
        if self.deferred:
            if error is not None:
                raise AgreedFailure() from error
            self._observe(loss)
            return False
        if finite_everywhere(loss, error, self.device, world_size):
            return False
        if self.nonfinite == "stop":
            raise NonFiniteLossError(step, float(loss.detach().float()))
        return True

    def _observe(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        ok = torch.isfinite(loss)
        self._value = torch.where(ok, self._value, loss)
        self._ok = ok if self._ok is None else self._ok & ok

    def step_flag(self) -> torch.Tensor | None:
        """At an optimizer step: the ``found_inf`` for :func:`optimizer_step` (None unless deferred)."""
        if not self.deferred:
            return None
        bad = ~self._ok
        self.steps += 1
        first = bad & (self.bad_steps == 0)
        self.first_bad = torch.where(first, self.steps, self.first_bad)
        self.first_value = torch.where(first, self._value, self.first_value)
        self.bad_steps += bad.long()
        self._ok = None
        return bad.float()

    def read(self, state, say) -> None:
        """Bring the counts to the host (one read) into ``state``; a non-finite loss under
        ``nonfinite="stop"`` raises :class:`NonFiniteLossError` for its step."""
        if not self.deferred:
            return
        steps, bad, first, value, files = torch.stack(
            [self.steps.double(), self.bad_steps.double(), self.first_bad.double(), self.first_value.double(),
             self.files.double()]
        ).tolist()
        self._reset()
        state.skipped_files += int(files)
        if not bad:
            return
        first_step = state.step - int(steps) + int(first)
        if self.nonfinite == "stop":
            raise NonFiniteLossError(first_step, value)
        state.nonfinite_skipped += int(bad)
        say(f"steps {first_step}-{state.step}: {int(bad)} with a non-finite loss skipped "
            f"({state.nonfinite_skipped} in all)")
