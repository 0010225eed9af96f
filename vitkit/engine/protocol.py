"""The engine's protocol: what a training run optimises, and what the loop may call on it.

An objective owns the network being trained (``self.model``) and any extra state (teacher, EMA
teacher, centers) as submodules or buffers. The loop only ever calls the methods below; a new
objective (distillation, MAE, DINO) plugs into the same loop by implementing them. Every
``on_step_end`` the loop calls (objective, callbacks, hooks) takes one :class:`StepContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import WeightsError
from .evaluators import MeanEvaluator


@dataclass
class StepContext:
    """What every ``on_step_end(ctx)`` sees after each optimizer step (``step`` counts from 1).

    ``applied`` is False for a step skipped for a non-finite loss (``engine.nonfinite=skip``);
    the objective and the EMA are called only for applied steps. ``metrics`` holds the last
    micro-batch's outputs, detached; ``lr`` is the rate the step used, ``grad_norm`` the
    clipped gradients' norm (None without ``optim.clip_grad``).
    """

    step: int
    total_steps: int
    optimizer: torch.optim.Optimizer
    trainer: Any
    lr: float = 0.0
    grad_norm: Tensor | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)
    applied: bool = True


class Objective(nn.Module):
    """Base class of every training objective.

    Subclasses set ``self.model`` and implement :meth:`forward`. The engine optimises the
    objective's parameters that require grad, except those of :meth:`frozen_modules`.

    Attributes:
        needs_raw_image: True when the objective wants ``batch["image_raw"]``, the augmented
            image in [0, 1] before normalisation (a teacher trained with another mean/std);
            the run asks the batch augmentation to keep it (``BatchAugment(keep_raw=...)``).
    """

    model: nn.Module
    needs_raw_image: bool = False

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """One training forward pass.

        Args:
            batch: dict of tensors (or lists of tensors for multi-view batches), already on device.

        Returns:
            ``{"loss": scalar tensor with grad, <metric>: scalar tensors}``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward(batch) -> dict")

    # ------------------------------------------------------------------ frozen modules

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Submodules (by attribute name) that are never trained: a teacher, an EMA teacher.

        They stay in eval mode whatever mode the engine sets, are never in the optimizer, and
        are saved in checkpoints unless :meth:`references` names them.
        """
        return {}

    def references(self) -> dict[str, dict]:
        """Frozen modules loaded from a file, recorded instead of saved: ``{name: {"source", "sha256"}}``.

        Their weights are left out of checkpoints; the run dir records where they came from.
        """
        return {}

    def check_references(self, recorded: dict[str, dict]) -> None:
        """Called on resume with the checkpoint's :meth:`references`: a module loaded again from
        its source must have the recorded sha256, else :class:`~vitkit.errors.WeightsError`."""
        for name, now in self.references().items():
            then = recorded.get(name) or {}
            if then.get("sha256") and then["sha256"] != now.get("sha256"):
                raise WeightsError(
                    f"the {name} loaded from {now.get('source')} (sha256 {str(now.get('sha256'))[:12]}...) is not "
                    f"the one this run was trained with ({then.get('source')}, sha256 {then['sha256'][:12]}...): "
                    f"resume with the same {name} weights, or start a new run"
                )

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_modules().values():
            m.eval()
        return self

    def freeze(self) -> None:
        """Turn off gradients of every frozen module (the engine calls this before building the optimizer)."""
        for m in self.frozen_modules().values():
            m.requires_grad_(False)

    def checkpoint_state_dict(self, sd: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``state_dict()`` (or ``sd``, e.g. gathered from FSDP shards) without the modules
        named by :meth:`references`: they are recorded, not saved."""
        skip = tuple(f"{name}." for name in self.references())
        sd = self.state_dict() if sd is None else sd
        return {k: v for k, v in sd.items() if not k.startswith(skip)} if skip else sd

    # ------------------------------------------------------------------ products

    def export_model(self) -> nn.Module:
        """The module a run exports as ``model.safetensors`` (DINO: the teacher)."""
        return self.model

    # ------------------------------------------------------------------ evaluation

    def evaluator(self):
        """A fresh evaluator for the validation set (see :mod:`vitkit.engine.evaluators`).

        The default averages the per-sample values of :meth:`evaluate`.
        """
        return MeanEvaluator()

    @torch.no_grad()
    def eval_outputs(self, batch: dict, model: nn.Module | None = None) -> dict[str, Tensor]:
        """What the evaluator's ``update`` receives for ``batch``, computed with ``model``.

        ``model`` stands in for ``self.model`` (the engine passes the EMA copy to evaluate it);
        None means ``self.model``. The default returns :meth:`evaluate`, which knows only
        ``self.model``.
        """
        if model is not None and model is not self.model:
            raise NotImplementedError(
                f"{type(self).__name__}.eval_outputs cannot evaluate another model (the EMA copy): "
                "implement eval_outputs(batch, model), or turn EMA off"
            )
        return self.evaluate(batch)

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, Tensor]:
        """Per-sample validation values, each of shape (B,).

        The default evaluates the training loss per batch, repeated per sample, which is only
        meaningful when the loss is a per-sample mean.
        """
        out = self(batch)
        first = next(iter(v for v in batch.values() if isinstance(v, Tensor)), None)
        b = first.shape[0] if first is not None else 1
        return {k: v.detach().float().expand(b) for k, v in out.items() if v.ndim == 0}

    # ------------------------------------------------------------------ hooks

    def on_step_end(self, ctx: StepContext) -> None:
        """Called after each applied optimizer step: EMA teachers, weight-decay schedules."""

    def no_weight_decay(self) -> set[str]:
        """Names (relative to the objective) of parameters excluded from weight decay."""
        fn = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in fn()} if callable(fn) else set()
