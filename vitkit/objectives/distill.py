"""What every distillation objective shares: config keys of the teacher, the frozen teacher, the KD term.

The objectives (``kd``, ``deit``, ``feature_kd``) are classification with a teacher: they
inherit the label loss, the accuracy evaluator and the two-head averaging at evaluation from
:class:`~vitkit.objectives.Supervised`, and add the teacher (:mod:`.teacher`) as a frozen
module. A teacher loaded from a source is recorded by reference (source and sha256) instead
of saved in every checkpoint; a teacher module passed in directly is state and is saved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .supervised import Supervised, SupervisedConfig
from .teacher import TEACHER_DTYPES, Teacher, load_teacher


@dataclass
class DistillConfig(SupervisedConfig):
    """``objective.*`` keys shared by the objectives with a teacher.

    ``teacher``: run dir, weights file, registered model name or hub id (see :mod:`.teacher`).
    ``teacher_model``: the architecture, for a weights file without vitkit metadata or a hub id.
    ``teacher_dtype``: ``float32`` or ``bfloat16`` (half the memory, faster on GPUs).
    ``teacher_img_size``: the side the teacher sees; None: the size it was built for.
    """

    teacher: str = ""
    teacher_model: str | None = None
    teacher_dtype: str = "float32"
    teacher_img_size: int | None = None

    def __post_init__(self):
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ConfigError(
                f"objective.teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}, got {self.teacher_dtype!r}"
            )
        if self.teacher_img_size is not None and self.teacher_img_size < 1:
            raise ConfigError(f"objective.teacher_img_size must be a positive side in pixels, got {self.teacher_img_size}")


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"objective.alpha weighs the teacher's term against the label's and must be in [0, 1], got {alpha}")


def check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ConfigError(f"objective.temperature must be > 0, got {temperature}")


KD_REDUCTIONS = ("batchmean", "deit")


def kd_term(student_logits: Tensor, teacher_logits: Tensor, temperature: float, reduction: str = "batchmean") -> Tensor:
    """``T² · KL(softmax(t/T) || softmax(s/T))`` summed over classes and samples, then divided.

    ``reduction="batchmean"`` divides by the batch size B: the per-sample KL of Hinton et al.
    (2015), averaged. ``"deit"`` divides by B·C, the number of logits, as DeiT's released
    ``DistillationLoss`` does (``reduction='sum'`` then ``/ outputs_kd.numel()``); DeiT's
    published ``alpha`` and ``tau`` were tuned with that, so it is C times lighter than batchmean.
    The T² keeps the gradient's scale independent of T, so ``alpha`` means the same at every
    temperature.
    """
    if reduction not in KD_REDUCTIONS:
        raise ConfigError(f"the KD reduction must be one of {', '.join(KD_REDUCTIONS)}, got {reduction!r}")
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, C)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    if reduction == "batchmean":
        return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2
    return F.kl_div(s, t, reduction="sum", log_target=True) * temperature**2 / s.numel()


class TeacherObjective(Supervised):
    """Classification with a frozen teacher (base of ``kd``, ``deit``, ``feature_kd``).

    Args:
        model: the student.
        teacher: a :class:`Teacher`, or any module (wrapped in one, which feeds it the
            student's images at its card's size and normalisation).
        num_classes, label_smoothing, aux_weight: as in :class:`Supervised`.
        reference: ``{"source", "sha256", ...}`` when the teacher was loaded from a source: its
            weights are then left out of checkpoints and loaded again on resume. None: the
            teacher is state, saved with the objective.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, num_classes: int, *, reference: dict | None = None,
                 label_smoothing: float = 0.1, aux_weight: float = 0.01):
        super().__init__(model, num_classes, label_smoothing=label_smoothing, aux_weight=aux_weight)
        self.teacher = teacher if isinstance(teacher, Teacher) else Teacher(teacher, model)
        self.reference = dict(reference) if reference is not None else None

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def references(self) -> dict[str, dict]:
        return {"teacher": dict(self.reference)} if self.reference is not None else {}

    def check_teacher_classes(self) -> None:
        """The teacher must predict the student's classes (logit objectives)."""
        n = getattr(self.teacher.model, "num_classes", None)
        if n is not None and n != self.num_classes:
            source = (self.reference or {}).get("source", "the teacher")
            raise ConfigError(
                f"{source} predicts {n} classes but the student {self.num_classes}: distil from a teacher "
                "trained on the same classes (train one with `vitkit train`, then objective.teacher=<its run dir>)"
            )

    @classmethod
    def from_config(cls, model: nn.Module, cfg: DistillConfig, *, num_classes: int, label_smoothing: float = 0.1,
                    **_) -> TeacherObjective:
        net, ref = load_teacher(cfg.teacher, cfg.teacher_model, num_classes)
        teacher = Teacher(net, model, TEACHER_DTYPES[cfg.teacher_dtype], cfg.teacher_img_size)
        shared = {f.name for f in dataclasses.fields(DistillConfig)}
        own = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in shared}
        smoothing = cfg.label_smoothing if cfg.label_smoothing is not None else label_smoothing
        return cls(model, teacher, num_classes, reference=ref, label_smoothing=smoothing, aux_weight=cfg.aux_weight,
                   **own)
