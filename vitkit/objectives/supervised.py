"""Supervised classification: cross-entropy against hard labels or mixup soft targets, optionally class-weighted."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.evaluators import AccuracyEvaluator
from ..errors import ConfigError
from .base import Objective
from .registry import register_objective


@dataclass
class SupervisedConfig:
    """``objective.*`` keys of ``supervised``.

    ``label_smoothing`` None takes ``data.label_smoothing`` (which mixup also uses).
    ``tta``: test-time augmentation at evaluation: "none", or "hflip" (the mean of the logits of
    the image and its mirror image; twice the evaluation cost, for data where flips keep the class).
    """

    label_smoothing: float | None = None
    aux_weight: float = 0.01
    tta: str = "none"


TTA_MODES = ("none", "hflip")


def tta_logits(model: nn.Module, images: Tensor, tta: str = "none") -> Tensor:
    """(B, C) logits of ``model`` on ``images`` (B, C, H, W), averaged over the ``tta`` views."""
    logits = _logits(model(images)).float()
    if tta == "hflip":
        logits = 0.5 * (logits + _logits(model(images.flip(-1))).float())
    return logits


def _logits(out: Tensor | tuple[Tensor, ...]) -> Tensor:
    # A distilled ViT in train mode returns (cls_logits, dist_logits); without a teacher both
    # heads learn the label, and the average is what the model predicts at inference.
    if isinstance(out, (tuple, list)):
        return torch.stack(list(out)).mean(0)
    return out


def _check_weights(weights, num_classes: int) -> Tensor | None:
    """``weights`` as a float32 (num_classes,) tensor, or a ConfigError saying what is wrong with them."""
    if weights is None:
        return None
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (num_classes,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ConfigError(
            f"class_weights {w.tolist()} do not fit {num_classes} classes: give one finite weight >= 0 per class"
        )
    return w


def topk_correct(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    """(B, C) logits, (B,) labels -> (B,) float: 1 where the label is among the top k."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices  # (B, k)
    return (top == labels[:, None]).any(-1).float()


@register_objective("supervised", SupervisedConfig)
class Supervised(Objective):
    """Cross-entropy classification.

    Args:
        model: network mapping ``batch["image"]`` (B, 3, H, W) to logits (B, num_classes), or to a
            tuple of logits (distilled ViT in train mode).
        num_classes: number of classes; top-5 accuracy becomes top-``num_classes`` below 5.
        label_smoothing: applied with hard labels; soft ``batch["target"]`` (B, num_classes)
            from mixup already carries its smoothing.
        aux_weight: weight of the model's ``aux_loss()`` (MoE load balancing) added to the loss.
        tta: test-time augmentation of evaluation, "none" or "hflip" (see :class:`SupervisedConfig`).
        class_weights: (num_classes,) weights of the training cross-entropy (``data.balance=loss``:
            :func:`vitkit.data.balance.balanced_class_weights`), or None. A sample's loss is
            ``-sum_c w_c t_c log p_c`` over its target ``t`` (the one-hot label, smoothed, or mixup's soft
            target): PyTorch's weighted cross-entropy, which ``F.cross_entropy(weight=w, label_smoothing=e)``
            computes for a hard label, so hard, smoothed and mixed targets are weighted alike. The batch's
            loss is the mean over its samples, as PyTorch's mean for soft targets (its mean for hard labels
            divides by the sum of the labels' weights instead): every batch then estimates the same
            weighted loss over the training set, whatever classes it holds. Evaluation stays unweighted.
    """

    def __init__(self, model: nn.Module, num_classes: int, label_smoothing: float = 0.1, aux_weight: float = 0.01,
                 tta: str = "none", class_weights: Tensor | None = None):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if tta not in TTA_MODES:
            raise ConfigError(f"objective.tta={tta!r} is not one of {', '.join(TTA_MODES)}")
        self.tta = tta
        self.model = model
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.aux_weight = aux_weight
        # Not saved: derived from the training data by each run, and checkpoints keep their keys.
        self.register_buffer("class_weights", _check_weights(class_weights, num_classes), persistent=False)

    def task_loss(self, logits: Tensor, batch: dict) -> Tensor:
        """Cross-entropy of (B, C) ``logits`` against ``batch["target"]`` (mixup) or ``batch["label"]``."""
        target, w = batch.get("target"), self.class_weights
        if w is not None:
            w = w.to(logits.dtype)
        if target is not None:
            if w is not None:
                target = target * w
            return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        if batch.get("label") is not None:
            label = batch["label"]
            if w is not None:
                return F.cross_entropy(logits, label, weight=w, label_smoothing=self.label_smoothing,
                                       reduction="sum") / label.shape[0]
            return F.cross_entropy(logits, label, label_smoothing=self.label_smoothing)
        raise KeyError(f"{type(self).__name__} needs batch['label'] (B,) or batch['target'] (B, num_classes)")

    def add_aux_loss(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """Add the model's ``aux_loss()`` of this forward pass (MoE load balancing) to ``out["loss"]``."""
        aux_loss = getattr(self.model, "aux_loss", None)
        if callable(aux_loss) and self.aux_weight:
            # Mixture-of-Experts models expose a load-balancing loss from this forward pass.
            aux = aux_loss()
            if aux.requires_grad:
                out["loss"] = out["loss"] + self.aux_weight * aux
                out["aux_loss"] = aux.detach()
        return out

    def forward(self, batch: dict) -> dict[str, Tensor]:
        logits = _logits(self.model(batch["image"])).float()  # (B, C)
        label = batch.get("label")
        out = self.add_aux_loss({"loss": self.task_loss(logits, batch)})
        if label is not None:
            out["acc1"] = (logits.argmax(-1) == label).float().mean().detach()
        return out

    @classmethod
    def from_config(cls, model: nn.Module, cfg: SupervisedConfig, *, num_classes: int, label_smoothing: float = 0.1,
                    class_weights: Tensor | None = None, **_) -> Supervised:
        smoothing = cfg.label_smoothing if cfg.label_smoothing is not None else label_smoothing
        return cls(model, num_classes, label_smoothing=smoothing, aux_weight=cfg.aux_weight, tta=cfg.tta,
                   class_weights=class_weights)

    def evaluator(self):
        return AccuracyEvaluator(self.num_classes)

    @torch.no_grad()
    def eval_outputs(self, batch: dict, model: nn.Module | None = None) -> dict[str, Tensor]:
        return {"logits": tta_logits(model if model is not None else self.model, batch["image"], self.tta)}

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, Tensor]:
        logits = tta_logits(self.model, batch["image"], self.tta)  # (B, C)
        label = batch["label"]
        return {
            "loss": F.cross_entropy(logits, label, reduction="none"),
            "acc1": topk_correct(logits, label, 1),
            "acc5": topk_correct(logits, label, 5),
        }
