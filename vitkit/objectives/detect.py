"""Object detection (``detect``): any registered :class:`~vitkit.detect.Detector` through the one Trainer.

The detector owns its loss (DETR's set loss, FCOS's focal + GIoU + centerness) and its
post-processing; this objective only turns a padded detection batch into what the detector's
interface asks for: a ``pixel_mask`` of the real pixels (from ``batch["size"]``) and one target
dict per image. Evaluation keeps the ``top_k`` best detections per image and scores them with
COCO's AP (:class:`~vitkit.detect.evaluate.CocoEvaluator`, primary metric ``ap``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from .base import Objective
from .registry import register_objective


def pixel_mask(images: Tensor, size: Tensor | None) -> Tensor:
    """(B, H, W) bool, True on the real pixels of each padded image (``size`` (B, 2) true (h, w); None: all real)."""
    B, _, H, W = images.shape
    if size is None:
        return torch.ones(B, H, W, dtype=torch.bool, device=images.device)
    size = size.to(images.device)
    rows = torch.arange(H, device=images.device).view(1, H, 1) < size[:, 0].view(B, 1, 1)
    cols = torch.arange(W, device=images.device).view(1, 1, W) < size[:, 1].view(B, 1, 1)
    return rows & cols


def batch_targets(batch: dict) -> list[dict]:
    """One target per image, as :meth:`Detector.loss` reads them: ``boxes`` (K, 4) float xyxy pixels,
    ``labels`` (K,) int64, ``size`` (2,) the image's true (h, w)."""
    try:
        boxes, labels, size = batch["boxes"], batch["labels"], batch["size"]
    except KeyError as e:
        raise DataError(
            f"a detection batch needs 'boxes', 'labels' and 'size', this one has {sorted(batch)} (missing {e}): "
            "train a detector on detection data (COCO JSON, Pascal VOC XML, or scenes with --task detect)"
        ) from None
    return [{"boxes": b.float(), "labels": lab.long(), "size": s} for b, lab, s in zip(boxes, labels, size)]


@dataclass
class DetectConfig:
    """``objective.*`` keys of ``detect``.

    ``backbone_lr``: the backbone's learning rate as a fraction of the detector's (None: the
    detector's own ``backbone_lr_mult``, DETR's 0.1 (1e-5 vs 1e-4), else 1). With
    ``optim.layer_decay`` set, the backbone's blocks decay layer by layer instead.
    ``top_k``: detections per image kept for evaluation (COCO's maxDets is 100).
    """

    backbone_lr: float | None = None
    top_k: int = 100


@register_objective("detect", DetectConfig)
class Detect(Objective):
    """Trains a :class:`~vitkit.detect.Detector` with its own loss; evaluates COCO AP.

    Args:
        model: the detector (``forward(images, pixel_mask)``, ``loss``, ``postprocess``).
        classes: the object class names (for the per-class AP); None: their indices.
        backbone_lr, top_k: see :class:`DetectConfig`.
    """

    def __init__(self, model: nn.Module, classes: list[str] | None = None, backbone_lr: float | None = None,
                 top_k: int = 100):
        super().__init__()
        for fn in ("loss", "postprocess"):
            if not callable(getattr(model, fn, None)):
                raise ConfigError(
                    f"objective.name=detect trains a detector (vitkit.detect.create_detector), but "
                    f"{type(model).__name__} has no {fn}(): set model.head to a detector"
                )
        if top_k < 1:
            raise ConfigError(f"objective.top_k must be >= 1, got {top_k}")
        if backbone_lr is not None and not 0 < backbone_lr <= 1:
            raise ConfigError(f"objective.backbone_lr must be in (0, 1] (a fraction of the lr), got {backbone_lr}")
        self.model = model
        n = int(getattr(model, "num_classes", 0) or 0)
        self.classes = list(classes) if classes else [str(i) for i in range(n)]
        own = getattr(model, "backbone_lr_mult", None)
        self.backbone_lr = float(backbone_lr if backbone_lr is not None else (own if own is not None else 1.0))
        self.top_k = top_k
        self._groups = "none"  # set by optim_config: how the optimizer groups parameters

    @classmethod
    def from_config(cls, model: nn.Module, cfg: DetectConfig, *, classes=None, **_) -> Detect:
        return cls(model, classes, cfg.backbone_lr, cfg.top_k)

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict) -> dict[str, Tensor]:
        images = batch["image"]
        mask = pixel_mask(images, batch.get("size"))
        outputs = self.model(images, mask)
        losses = self.model.loss(outputs, batch_targets(batch))
        if "loss" not in losses:
            raise ConfigError(f"{type(self.model).__name__}.loss() must return a 'loss' entry, got {sorted(losses)}")
        return {k: (v if k == "loss" else v.detach()) for k, v in losses.items()
                if isinstance(v, Tensor) and v.ndim == 0}

    # ------------------------------------------------------------------ evaluation
    def evaluator(self):
        from ..detect.evaluate import CocoEvaluator

        return CocoEvaluator(self.classes)

    @torch.no_grad()
    def eval_outputs(self, batch: dict, model: nn.Module | None = None) -> dict:
        model = model if model is not None else self.model
        return {"detections": detect(model, batch["image"], batch.get("size"), self.top_k)}

    # ------------------------------------------------------------------ optimizer
    def optim_config(self, optim_cfg):
        """The optimizer settings the run trains with: the backbone's lr multiplier becomes a two-group
        layer decay (backbone, then the rest at the full lr) unless ``optim.layer_decay`` is set."""
        from dataclasses import replace

        if optim_cfg.layer_decay is not None:
            self._groups = "blocks"
            return optim_cfg
        if self.backbone_lr != 1.0:
            self._groups = "backbone"
            return replace(optim_cfg, layer_decay=self.backbone_lr)
        return optim_cfg

    def group_matcher(self, coarse: bool = False) -> dict:
        """Optimizer groups for lr scaling: the backbone, then the detector's own layers last."""
        if self._groups == "blocks":
            from ..dense.model import _prefixed

            fn = getattr(self.model.backbone, "group_matcher", None)
            if not callable(fn):
                raise ConfigError(f"optim.layer_decay needs a backbone with group_matcher(); "
                                  f"{type(self.model.backbone).__name__} has none: set optim.layer_decay=null")
            groups = {}
            for key, spec in fn(coarse).items():
                if isinstance(spec, (list, tuple)):
                    groups[key] = [(_prefixed(rx, "model.backbone."), suffix) for rx, suffix in spec]
                else:
                    groups[key] = _prefixed(spec, "model.backbone.")
            return groups
        return {"backbone": r"^model\.backbone\."}

    def papers(self) -> list[str]:
        return ["Lin et al. 2014, Microsoft COCO: Common Objects in Context (AP at IoU 0.50:0.95)"]


@torch.no_grad()
def detect(model: nn.Module, images: Tensor, size: Tensor | None = None, top_k: int = 100) -> list[dict]:
    """A detector's detections of a (padded) normalised batch: per image ``boxes`` (N, 4) xyxy pixels of
    the unpadded input, ``scores``, ``labels``, best first, at most ``top_k``."""
    B, _, H, W = images.shape
    if size is None:
        size = torch.tensor([[H, W]] * B, device=images.device)
    outputs = model(images, pixel_mask(images, size))
    return model.postprocess(outputs, size.to(images.device), top_k=top_k)
