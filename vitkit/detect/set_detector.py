"""What DETR and Deformable DETR share: the backbone (built by name, BatchNorm frozen, first stages
fixed, a lower learning rate), the rebuilding arguments and the set loss's target frame."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models import create_model, get_model_card
from .base import Detector
from .criterion import normalize_targets


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, never trained).

    DETR's backbones train with batches of one or two large images, too few for batch
    statistics, so the ImageNet statistics stay fixed. The state dict is BatchNorm2d's (with an
    unused ``num_batches_tracked``), so backbone checkpoints load unchanged; checkpoints without
    that counter (Hugging Face's, the reference's) load too.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "num_batches_tracked", self.num_batches_tracked)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def freeze_batch_norm(module: nn.Module) -> int:
    """Replace every BatchNorm2d (and SyncBatchNorm) in ``module`` by a :class:`FrozenBatchNorm2d`
    holding its current statistics; returns how many were replaced."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps).to(child.running_mean.device)
            with torch.no_grad():
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                if child.running_mean is not None:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
                    frozen.num_batches_tracked.copy_(child.num_batches_tracked)
            setattr(module, name, frozen)
            count += 1
        else:
            count += freeze_batch_norm(child)
    return count


def input_stride(backbone: nn.Module) -> int:
    """The input multiple ``backbone`` needs (its deepest stride)."""
    from ..dense.model import input_stride as dense_input_stride

    return dense_input_stride(backbone, None)


def build_backbone(backbone, backbone_args: dict | None) -> nn.Module:
    """A registered name built without a classifier (with ``backbone_args``), or a built backbone
    with its classifier removed."""
    if isinstance(backbone, str):
        args = dict(backbone_args or {})
        if "num_classes" in args:
            raise ConfigError("backbone_args may not set num_classes: a detector's backbone has no classifier")
        return create_model(backbone, num_classes=0, **args)
    if isinstance(backbone, nn.Module):
        if backbone_args:
            raise ConfigError("backbone_args apply to a backbone given by name; this backbone is already built")
        if getattr(backbone, "num_classes", 0) and callable(getattr(backbone, "reset_classifier", None)):
            backbone.reset_classifier(0)
        return backbone
    raise ConfigError(f"backbone must be a registered model name or a built backbone, got {type(backbone).__name__}")


class SetDetector(Detector):
    """Base of the set-prediction detectors over a vitkit backbone (DETR, Deformable DETR).

    Subclasses set ``backbone``, ``num_classes``, ``backbone_lr_mult``, ``_args`` (their own
    constructor arguments) and ``_backbone_args``, and define ``criterion()``.
    """

    def _freeze_backbone(self, train_backbone: bool, frozen_stages: int) -> None:
        params = list(self.backbone.named_parameters())
        if not train_backbone:
            for _, p in params:
                p.requires_grad_(False)
            return
        if frozen_stages <= 0:
            return
        # The stages are the feature points past the stem (stride > 2); everything registered
        # before the first trainable stage (stem, frozen stages) is frozen.
        stages = [f["module"] for f in self.backbone.feature_info if f["reduction"] > 2]
        first = stages[frozen_stages] + "." if frozen_stages < len(stages) else None
        for name, p in params:
            if first is not None and name.startswith(first):
                break
            p.requires_grad_(False)

    # ------------------------------------------------------------------ rebuilding, optimizer
    @property
    def model_args(self) -> dict:
        """The arguments of :func:`~vitkit.detect.create_detector` that rebuild this model (fresh weights)."""
        name = getattr(self.backbone, "model_name", None)
        if name is not None:
            card = get_model_card(name).config
            args = {k: v for k, v in (getattr(self.backbone, "model_args", {}) or {}).items()
                    if k != "num_classes" and (k not in card or card[k] != v)}
            if "img_size" in args and isinstance(args["img_size"], tuple):
                args["img_size"] = list(args["img_size"])
        else:
            args = self._backbone_args
        return dict(name=self.detector_name, backbone=name, num_classes=self.num_classes, **self._args,
                    backbone_args=args)

    def param_groups_hint(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter-name prefix: ``{"backbone.": backbone_lr_mult}``
        (DETR trains its backbone at 1e-5 against 1e-4 for the rest)."""
        return {"backbone.": self.backbone_lr_mult}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's activations in backward instead of storing them."""
        self.backbone.set_grad_checkpointing(enable)

    def loss(self, outputs: dict, targets: list[dict]) -> dict:
        """Set loss of ``outputs`` against ``targets`` (xyxy pixel boxes, labels, true ``size``
        per image; see :class:`~vitkit.detect.Detector`)."""
        device = outputs["pred_logits"].device
        targets = [{"boxes": torch.as_tensor(t["boxes"], dtype=torch.float32, device=device).reshape(-1, 4),
                    "labels": torch.as_tensor(t["labels"], dtype=torch.int64, device=device),
                    "size": torch.as_tensor(t["size"], device=device)} for t in targets]
        return self.criterion().to(device)(outputs, normalize_targets(targets))

