"""Knowledge distillation (Hinton et al., 2015): the label's cross-entropy plus the teacher's softened logits."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .distill import DistillConfig, TeacherObjective, check_alpha, check_temperature, kd_term
from .registry import register_objective
from .supervised import _logits


@dataclass
class KDConfig(DistillConfig):
    """``objective.*`` keys of ``kd``: ``alpha`` weighs the teacher's term, ``temperature`` softens both sides."""

    alpha: float = 0.5
    temperature: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        check_alpha(self.alpha)
        check_temperature(self.temperature)


@register_objective("kd", KDConfig)
class KD(TeacherObjective):
    """``loss = (1 - alpha) · CE(s, y) + alpha · T² · KL(softmax(t/T) || softmax(s/T))``.

    ``CE`` is the supervised loss (label smoothing, or mixup's soft targets); ``s`` are the
    student's logits (a distilled ViT's two heads averaged), ``t`` the teacher's on the same
    images. See :class:`~vitkit.objectives.distill.TeacherObjective` for the other arguments.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, num_classes: int, *, alpha: float = 0.5,
                 temperature: float = 4.0, **kw):
        super().__init__(model, teacher, num_classes, **kw)
        check_alpha(alpha)
        check_temperature(temperature)
        self.alpha, self.temperature = alpha, temperature
        self.check_teacher_classes()

    def forward(self, batch: dict) -> dict[str, Tensor]:
        x = batch["image"]
        logits = _logits(self.model(x)).float()  # (B, C)
        teacher = self.teacher(x)  # (B, C), no grad
        ce = self.task_loss(logits, batch)
        kd = kd_term(logits, teacher, self.temperature)
        out = self.add_aux_loss({"loss": (1 - self.alpha) * ce + self.alpha * kd})
        out.update(ce=ce.detach(), kd=kd.detach(),
                   teacher_agree=(logits.argmax(-1) == teacher.argmax(-1)).float().mean())
        if batch.get("label") is not None:
            out["acc1"] = (logits.argmax(-1) == batch["label"]).float().mean()
        return out
