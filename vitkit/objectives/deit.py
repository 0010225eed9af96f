"""DeiT distillation through the distillation token (Touvron et al., 2021).

The class head learns the label; the distillation head learns the teacher: its argmax
(``hard``, the paper's best) or its softened distribution (``soft``). At evaluation the
student predicts with the average of the two heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .distill import KD_REDUCTIONS, DistillConfig, TeacherObjective, check_alpha, check_temperature, kd_term
from .registry import register_objective

_TYPES = ("hard", "soft")


@dataclass
class DeiTConfig(DistillConfig):
    """``objective.*`` keys of ``deit``: ``distill_type`` hard|soft, ``alpha`` weighs the distillation head's
    loss, ``temperature`` softens both sides of the soft loss, ``soft_reduction`` deit|batchmean divides
    the soft loss's sum by B·C (DeiT's released code, the default) or by B (see :class:`DeiT`)."""

    distill_type: str = "hard"
    alpha: float = 0.5
    temperature: float = 1.0
    soft_reduction: str = "deit"

    def __post_init__(self):
        super().__post_init__()
        if self.distill_type not in _TYPES:
            raise ConfigError(f"objective.distill_type must be hard or soft, got {self.distill_type!r}")
        _check_reduction(self.soft_reduction)
        check_alpha(self.alpha)
        check_temperature(self.temperature)


def _check_reduction(reduction: str) -> None:
    if reduction not in KD_REDUCTIONS:
        raise ConfigError(
            f"objective.soft_reduction must be deit (DeiT's released code: the summed KL over B·C logits) or "
            f"batchmean (over B samples, C times heavier), got {reduction!r}"
        )


def _no_dist_head(model: nn.Module) -> ConfigError:
    name = getattr(model, "model_name", type(model).__name__)
    return ConfigError(
        f"objective deit needs a student with a distillation token and head (head_dist), and {name} has none: "
        "use a *_distilled model (deit_tiny_distilled_patch16_224, ...) or model.args.distilled=true with "
        "token pooling, or distil through the logits with objective.name=kd"
    )


@register_objective("deit", DeiTConfig)
class DeiT(TeacherObjective):
    """``loss = (1 - alpha) · CE(cls_head, y) + alpha · L_dist(dist_head, teacher)``.

    ``L_dist`` is ``CE(dist_head, argmax t)`` for ``hard`` and ``T² · KL(softmax(t/T) ||
    softmax(dist_head/T))`` for ``soft``. The student must return ``(cls_logits, dist_logits)``
    in train mode, as a distilled vitkit ViT does.

    ``soft_reduction`` says what the soft KL, summed over the batch and the classes, is divided
    by. ``"deit"`` (the default): B·C, the number of logits, as DeiT's released
    ``DistillationLoss`` does; the paper's ``alpha=0.5, tau=1`` were tuned with it.
    ``"batchmean"``: B, the per-sample KL of the paper's formula and of Hinton's KD (``kd``),
    C times heavier at the same ``alpha`` (1000x on ImageNet); kept for runs tuned that way.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, num_classes: int, *, distill_type: str = "hard",
                 alpha: float = 0.5, temperature: float = 1.0, soft_reduction: str = "deit", **kw):
        if not any(n.startswith("head_dist.") for n, _ in model.named_parameters()):
            raise _no_dist_head(model)
        super().__init__(model, teacher, num_classes, **kw)
        if distill_type not in _TYPES:
            raise ConfigError(f"distill_type must be hard or soft, got {distill_type!r}")
        check_alpha(alpha)
        check_temperature(temperature)
        _check_reduction(soft_reduction)
        self.distill_type, self.alpha, self.temperature = distill_type, alpha, temperature
        self.soft_reduction = soft_reduction
        self.check_teacher_classes()

    def forward(self, batch: dict) -> dict[str, Tensor]:
        x = batch["image"]
        out = self.model(x)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise _no_dist_head(self.model)
        cls_logits, dist_logits = out[0].float(), out[1].float()  # (B, C) each
        teacher = self.teacher(x)  # (B, C), no grad
        ce = self.task_loss(cls_logits, batch)
        if self.distill_type == "hard":
            dist = F.cross_entropy(dist_logits, teacher.argmax(-1))
        else:
            dist = kd_term(dist_logits, teacher, self.temperature, self.soft_reduction)
        result = self.add_aux_loss({"loss": (1 - self.alpha) * ce + self.alpha * dist})
        logits = (cls_logits + dist_logits) / 2
        result.update(ce=ce.detach(), dist=dist.detach(),
                      teacher_agree=(dist_logits.argmax(-1) == teacher.argmax(-1)).float().mean())
        if batch.get("label") is not None:
            result["acc1"] = (logits.argmax(-1) == batch["label"]).float().mean()
        return result
