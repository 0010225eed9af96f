"""Feature distillation (FitNets, Romero et al., 2015): the student's block features regressed to the teacher's.

A learned 1x1 projection maps the student's feature map to the teacher's channels; the
projection is part of the objective (trained, checkpointed) and not of the exported model.
Only the backbone API is used: ``forward_intermediates`` for both, ``forward_head`` for the
student's logits from the same forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .distill import DistillConfig, TeacherObjective
from .registry import register_objective
from .supervised import _logits


@dataclass
class FeatureKDConfig(DistillConfig):
    """``objective.*`` keys of ``feature_kd``: ``feature_weight`` weighs the feature loss against the label's;
    ``student_index`` / ``teacher_index`` pick the blocks (negative counts from the end)."""

    feature_weight: float = 1.0
    student_index: int = -1
    teacher_index: int = -1

    def __post_init__(self):
        super().__post_init__()
        if self.feature_weight < 0:
            raise ConfigError(f"objective.feature_weight must be >= 0, got {self.feature_weight}")


def _needs_intermediates(model: nn.Module, who: str) -> None:
    if not callable(getattr(model, "forward_intermediates", None)):
        raise ConfigError(
            f"objective feature_kd reads block features through forward_intermediates, which the {who} "
            f"({type(model).__name__}) does not have: use a vitkit backbone, or objective.name=kd"
        )


@register_objective("feature_kd", FeatureKDConfig)
class FeatureKD(TeacherObjective):
    """``loss = CE(s, y) + feature_weight · MSE(interp(proj(f_s)), LN(f_t))``.

    ``f_s`` (B, Cs, h, w) and ``f_t`` (B, Ct, H, W) are the chosen blocks' feature maps; ``proj`` is
    a 1x1 convolution Cs -> Ct, ``interp`` resizes to the teacher's grid, and ``LN`` normalises
    each teacher feature vector (zero mean, unit variance over channels) so that the loss's
    scale does not depend on the teacher's activations.

    Args:
        input_size: (C, H, W) of the student's images, used once to size the projection; None
            reads the student's card.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, num_classes: int, *, feature_weight: float = 1.0,
                 student_index: int = -1, teacher_index: int = -1,
                 input_size: tuple[int, int, int] | None = None, **kw):
        super().__init__(model, teacher, num_classes, **kw)
        _needs_intermediates(model, "student")
        _needs_intermediates(self.teacher.model, "teacher")
        self.feature_weight = feature_weight
        self.student_index, self.teacher_index = student_index, teacher_index
        size = input_size or getattr(getattr(model, "card", None), "input_size", None)
        if size is None:
            raise ConfigError("feature_kd needs the student's input_size (C, H, W) to size its projection")
        probe = torch.zeros(1, *size, device=next(model.parameters()).device)
        was_training = model.training
        model.eval()  # a probe in eval mode draws no dropout and moves no norm statistics
        with torch.no_grad():
            s = self._student(probe)[1]
        model.train(was_training)
        t = self.teacher.intermediates(probe, teacher_index)
        self.proj = nn.Conv2d(s.shape[1], t.shape[1], kernel_size=1)

    def _student(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One forward pass -> (logits (B, C), feature map (B, Cs, h, w))."""
        final, feats = self.model.forward_intermediates(x, indices=[self.student_index])
        return _logits(self.model.forward_head(final)), feats[0]

    def forward(self, batch: dict) -> dict[str, Tensor]:
        x = batch["image"]
        logits, f_s = self._student(x)
        logits = logits.float()
        f_t = self.teacher.intermediates(x, self.teacher_index)  # (B, Ct, H, W), no grad
        pred = self.proj(f_s.float())  # (B, Ct, h, w)
        if pred.shape[-2:] != f_t.shape[-2:]:
            pred = F.interpolate(pred, size=f_t.shape[-2:], mode="bilinear", align_corners=False)
        target = F.layer_norm(f_t.permute(0, 2, 3, 1), f_t.shape[1:2]).permute(0, 3, 1, 2)  # LN over channels
        ce = self.task_loss(logits, batch)
        feat = F.mse_loss(pred, target)
        out = self.add_aux_loss({"loss": ce + self.feature_weight * feat})
        out.update(ce=ce.detach(), feature=feat.detach())
        if batch.get("label") is not None:
            out["acc1"] = (logits.argmax(-1) == batch["label"]).float().mean()
        return out
