"""The frozen teacher of the distillation objectives: where it comes from, and what it sees.

:func:`load_teacher` turns ``objective.teacher`` into a model and a reference (source and the
sha256 of its weights). A source is anything :func:`vitkit.load_model` reads:

- a run directory, a checkpoint directory or a ``.safetensors`` file written by vitkit (the
  architecture and preprocessing travel with the weights);
- any other weights file or a hub id, with ``objective.teacher_model`` naming the architecture
  (a hub id published by a registered model needs no name);
- a registered model name, with the weights its card publishes.

:class:`Teacher` wraps the model: frozen, in eval mode, optionally in bfloat16, fed the
student's batch at its own resolution and normalisation. Its weights are recorded by
reference, never saved in checkpoints; resume loads the source again and checks the hash
(:meth:`vitkit.objectives.Objective.check_references`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, PathNotFoundError
from ..models import list_models
from ..source import ArchitectureNeededError, load_model
from ..weights_io import state_sha256

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def weights_sha256(model: nn.Module) -> str:
    """The teacher's identity: :func:`vitkit.weights_io.state_sha256` of its whole state dict."""
    return state_sha256(model)


def _build(source: str, model_name: str | None, num_classes: int | None) -> nn.Module:
    """``load_model`` with the messages phrased in the objective's keys."""
    try:
        model = load_model(source, device="cpu", model_name=model_name, num_classes=num_classes).model
    except ArchitectureNeededError as e:
        raise ConfigError(
            f"objective.teacher={source} {e.what}: name its architecture with objective.teacher_model=<registered name>"
        ) from None
    except PathNotFoundError:
        raise PathNotFoundError(
            f"objective.teacher={source!r} is not an existing run directory or weights file, a registered model "
            "(see `vitkit models`) or a hub id 'owner/name'"
        ) from None
    except ConfigError as e:
        if source not in list_models():
            raise ConfigError(f"objective.teacher={source}: {e}") from None
        raise ConfigError(
            f"objective.teacher={source}: {e}. Train a teacher first and pass its run directory "
            "(objective.teacher=runs/<teacher run>), or a weights file with objective.teacher_model"
        ) from None
    if model_name and model_name != getattr(model, "model_name", model_name):
        raise ConfigError(
            f"objective.teacher={source} holds a {model.model_name}, but objective.teacher_model={model_name}:"
            " drop teacher_model (the weights carry their architecture)"
        )
    return model


def load_teacher(source: str | os.PathLike, model_name: str | None = None,
                 num_classes: int | None = None) -> tuple[nn.Module, dict]:
    """Build the teacher named by ``source``; returns (model in eval mode, reference).

    ``num_classes`` sizes the head of an architecture named by ``model_name`` (a file without
    metadata); sources that carry their config keep their own head. The reference is
    ``{"source", "model", "sha256"}``; the sha256 is of the weights as loaded (see
    :func:`weights_sha256`).
    """
    if not str(source):
        raise ConfigError("this objective needs a teacher: set objective.teacher=<run dir, weights file, model or hub id>")
    model = _build(str(source), model_name, num_classes)
    ref = {"source": str(source), "model": getattr(model, "model_name", type(model).__name__),
           "sha256": weights_sha256(model)}
    return model.eval(), ref


def _norm_stats(model: nn.Module) -> tuple[Tensor, Tensor] | None:
    card = getattr(model, "card", None)
    if card is None:
        return None
    return torch.tensor(card.mean, dtype=torch.float32), torch.tensor(card.std, dtype=torch.float32)


class TeacherInput(nn.Module):
    """The student's normalised batch -> the teacher's input at its own size, channels and mean/std.

    The student's normalisation is undone on the very image the student sees (after random
    erasing and mixup), so the teacher judges the same pixels; then the image is resized and
    normalised with the teacher's statistics.

    Args:
        student_norm / teacher_norm: per-channel (mean, std); None on either side (a model
            without a card) means both use the same normalisation and it is left as is.
        size: (H, W) the teacher sees; None keeps the student's.
        channels: the teacher's channel count; a 1-channel student is repeated to it.
    """

    def __init__(self, student_norm: tuple[Tensor, Tensor] | None, teacher_norm: tuple[Tensor, Tensor] | None,
                 size: tuple[int, int] | None = None, channels: int | None = None):
        super().__init__()
        renorm = student_norm is not None and teacher_norm is not None
        cs = len(student_norm[0]) if student_norm is not None else None
        self.channels = channels or (len(teacher_norm[0]) if teacher_norm is not None else cs)
        if cs is not None and self.channels is not None and cs not in (1, self.channels):
            raise ConfigError(
                f"the student sees {cs}-channel images but the teacher takes {self.channels} channels: only equal "
                "counts or a 1-channel student (repeated for the teacher) can be distilled"
            )
        self.size = tuple(size) if size is not None else None
        # x_teacher = (x_student * s_std + s_mean - t_mean) / t_std; identity when not renormalising.
        stats = (*student_norm, *teacher_norm) if renorm else (torch.zeros(1), torch.ones(1)) * 2
        for name, v in zip(("s_mean", "s_std", "t_mean", "t_std"), stats):
            self.register_buffer(name, v.float().view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        raw = x.float() * self.s_std + self.s_mean  # (B, Cs, H, W), [0, 1] when renormalising
        if self.channels is not None and raw.shape[1] != self.channels:
            raw = raw.expand(-1, self.channels, -1, -1)  # grey -> the teacher's channels
        if self.size is not None and tuple(raw.shape[-2:]) != self.size:
            down = self.size[0] < raw.shape[-2] or self.size[1] < raw.shape[-1]
            raw = F.interpolate(raw, size=self.size, mode="bilinear", align_corners=False, antialias=down)
        return (raw - self.t_mean) / self.t_std


class Teacher(nn.Module):
    """A frozen model with its input adapter: ``teacher(student_images) -> logits`` without gradients.

    Args:
        model: the teacher network (backbone API).
        student: the student, whose card gives the normalisation of ``batch["image"]``.
        dtype: the teacher's weights and input dtype; outputs come back in float32.
        img_size: the side the teacher sees; None: its card's input size (else the student's).
    """

    def __init__(self, model: nn.Module, student: nn.Module, dtype: torch.dtype = torch.float32,
                 img_size: int | None = None):
        super().__init__()
        card = getattr(model, "card", None)
        size = (img_size, img_size) if img_size else (tuple(card.input_size[1:]) if card is not None else None)
        channels = card.input_size[0] if card is not None else None
        self.input = TeacherInput(_norm_stats(student), _norm_stats(model), size, channels)
        self.model = model.to(dtype).eval().requires_grad_(False)
        self.dtype = dtype

    def train(self, mode: bool = True):
        return super().train(False)  # a teacher is never trained, whatever the caller asks

    @torch.no_grad()
    def forward(self, image: Tensor) -> Tensor:
        out = self.model(self.input(image).to(self.dtype))
        if isinstance(out, (tuple, list)):  # a distilled teacher: its prediction is the heads' average
            out = torch.stack(list(out)).mean(0)
        return out.float()

    @torch.no_grad()
    def intermediates(self, image: Tensor, index: int) -> Tensor:
        """Block ``index``'s feature map (B, C, H', W'), float32, through the backbone API."""
        feats = self.model.forward_intermediates(self.input(image).to(self.dtype), indices=[index],
                                                 intermediates_only=True)
        return feats[0].float()
