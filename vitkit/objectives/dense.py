"""Dense objectives: semantic segmentation (``segment``) and monocular depth (``depth``).

Both wrap any network mapping ``batch["image"]`` (B, 3, H, W) to a per-pixel map (B, C, H, W) at
the input size (a :class:`~vitkit.dense.DenseModel`), and evaluate it at full resolution with
:func:`~vitkit.dense.infer.dense_predict` (sliding windows when ``window`` is set).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dense.infer import dense_predict
from ..dense.losses import (
    SSI_VARIANTS,
    class_weights,
    dice_loss,
    gradient_matching_loss,
    silog_loss,
    ssi_loss,
)
from ..engine.evaluators import DepthEvaluator, MIoUEvaluator
from ..errors import ConfigError, DataError
from .base import Objective
from .registry import register_objective

PAPERS = {
    "ssi": "Ranftl et al. 2020, Towards Robust Monocular Depth Estimation: Mixing Datasets for Zero-shot "
           "Cross-dataset Transfer (MiDaS)",
    "silog": "Eigen et al. 2014, Depth Map Prediction from a Single Image using a Multi-Scale Deep Network; "
             "Lee et al. 2019 (BTS) and Bhat et al. 2021 (AdaBins) for lambda=0.85 and 10*sqrt",
    "median_frequency": "Badrinarayanan et al. 2017, SegNet (median frequency balancing)",
    "dice": "Milletari et al. 2016, V-Net (soft Dice)",
    "slide": "MMSegmentation's slide_inference (sliding-window evaluation)",
}


def _per_sample(model: nn.Module, images: Tensor, size: Tensor | None, window, overlap: float) -> Tensor:
    """``dense_predict`` of each sample at its true size when the batch was padded to a common one.

    Collate pads smaller images bottom/right; the padding is ignore (mask) or 0 (depth) in the
    target, so metrics never count it, but a model with global context (a ViT) would see it. So a
    padded sample is predicted alone at its own size; its output is put back in place and the
    padding left at 0.
    """
    H, W = images.shape[-2:]
    if size is None or bool((size[:, 0] == H).all() and (size[:, 1] == W).all()):
        return dense_predict(model, images, window, overlap).float()
    outs = [dense_predict(model, images[i : i + 1, :, :h, :w], window, overlap).float()
            for i, (h, w) in enumerate(size.tolist())]
    full = outs[0].new_zeros(images.shape[0], outs[0].shape[1], H, W)
    for i, o in enumerate(outs):
        full[i, :, : o.shape[-2], : o.shape[-1]] = o[0]
    return full


def _check_padding(target: Tensor, size: Tensor | None, fill: float, what: str) -> None:
    # The evaluators rely on collate's padding carrying the "don't count" value.
    if size is None:
        return
    H, W = target.shape[-2:]
    for i, (h, w) in enumerate(size.tolist()):
        if (h < H and (target[i, h:] != fill).any()) or (w < W and (target[i, :, w:] != fill).any()):
            raise DataError(
                f"batch['{what}'] of sample {i} is padded beyond its size {h}x{w} with values other than {fill}: "
                f"the collate function must pad {what}s with {fill} so that padding is not scored"
            )


@dataclass
class SegmentConfig:
    """``objective.*`` keys of ``segment``.

    ``class_weights``: "none", "inverse", "inverse_sqrt", "median_frequency" (SegNet), or a list
    of one weight per class (see :func:`vitkit.dense.losses.class_weights`). ``dice_weight``: weight
    of the soft Dice loss added to cross-entropy (0: off). ``window``: sliding-window evaluation
    with this crop size (None: the whole image at once), ``overlap`` between windows.
    """

    class_weights: str | list[float] | None = "none"
    dice_weight: float = 0.0
    label_smoothing: float = 0.0
    window: int | None = None
    overlap: float = 1 / 3


@register_objective("segment", SegmentConfig)
class Segment(Objective):
    """Per-pixel cross-entropy (with ``ignore_index`` and optional class weights) plus optional Dice.

    Args:
        model: network mapping (B, 3, H, W) to logits (B, num_classes, H, W).
        num_classes, ignore_index: from the data; mask pixels equal to ``ignore_index`` count in
            neither loss nor metrics.
        weights: per-class cross-entropy weights (C,) or None.
    """

    def __init__(self, model: nn.Module, num_classes: int, ignore_index: int = 255, weights: Tensor | None = None,
                 dice_weight: float = 0.0, label_smoothing: float = 0.0, window: int | None = None,
                 overlap: float = 1 / 3, class_weights: str | list | None = "none"):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"segmentation needs at least 2 classes, the data has {num_classes}")
        if dice_weight < 0 or not 0 <= label_smoothing < 1:
            raise ConfigError(
                f"objective.dice_weight must be >= 0 and objective.label_smoothing in [0, 1), got "
                f"{dice_weight} and {label_smoothing}"
            )
        self.model = model
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.dice_weight, self.label_smoothing = dice_weight, label_smoothing
        self.window, self.overlap = window, overlap
        self.class_weights = class_weights
        # A buffer follows the objective to the device and is saved with it: resume sees the same weights.
        self.register_buffer("weights", weights.float() if weights is not None else None)

    @classmethod
    def from_config(cls, model: nn.Module, cfg: SegmentConfig, *, num_classes: int, ignore_index: int = 255,
                    class_counts=None, **_) -> Segment:
        w = class_weights(cfg.class_weights, num_classes, class_counts)
        return cls(model, num_classes, ignore_index, w, cfg.dice_weight, cfg.label_smoothing, cfg.window,
                   cfg.overlap, cfg.class_weights)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        mask = batch["mask"].long()
        logits = self.model(batch["image"]).float()  # (B, C, H, W)
        if logits.shape[-2:] != mask.shape[-2:]:
            raise ConfigError(
                f"the model's output {tuple(logits.shape[-2:])} is not the mask's size {tuple(mask.shape[-2:])}: "
                "a segmentation model must return logits at its input size"
            )
        valid = mask != self.ignore_index
        if not valid.any():
            # A crop of void only: cross-entropy's mean over no pixel is NaN; contribute nothing instead.
            loss = logits.sum() * 0.0
        else:
            loss = F.cross_entropy(logits, mask, weight=self.weights, ignore_index=self.ignore_index,
                                   label_smoothing=self.label_smoothing)
        out = {"loss": loss}
        if self.dice_weight:
            dice = dice_loss(logits, mask, self.ignore_index)
            out["loss"] = loss + self.dice_weight * dice
            out["ce"], out["dice"] = loss.detach(), dice.detach()
        correct = ((logits.argmax(1) == mask) & valid).sum()
        out["pixel_acc"] = (correct / valid.sum().clamp_min(1)).detach()
        return out

    def evaluator(self) -> MIoUEvaluator:
        return MIoUEvaluator(self.num_classes, self.ignore_index)

    @torch.no_grad()
    def eval_outputs(self, batch: dict, model: nn.Module | None = None) -> dict[str, Tensor]:
        size = batch.get("size")
        if "mask" in batch:
            _check_padding(batch["mask"], size, self.ignore_index, "mask")
        model = model if model is not None else self.model
        return {"logits": _per_sample(model, batch["image"], size, self.window, self.overlap)}

    def papers(self) -> list[str]:
        """The papers this objective's pieces follow."""
        out = [PAPERS["slide"]] if self.window else []
        if self.class_weights == "median_frequency":
            out.append(PAPERS["median_frequency"])
        if self.dice_weight:
            out.append(PAPERS["dice"])
        return out


@dataclass
class DepthConfig:
    """``objective.*`` keys of ``depth``.

    ``loss``: "ssi" (MiDaS's scale-and-shift-invariant loss) or "silog" (Eigen's scale-invariant
    log loss). ``ssi``: its variant, "trim" (the paper's main results), "mae" or "mse" (least
    squares alignment); ``trim`` the share of largest residuals left out; ``grad_weight`` MiDaS's
    gradient matching weight alpha (0.5) over ``grad_scales`` levels. ``space``: what the model's
    output means, "disparity" (inverse depth, MiDaS) or "depth"; None: disparity for ssi, depth
    for silog. ``silog_lambda`` and ``silog_sqrt`` (BTS/AdaBins' 10 * sqrt form). ``align``:
    evaluation alignment, None: "scale_shift" for ssi, "none" for silog. ``max_depth``: the cap
    of evaluated depth (None: each image's largest valid depth). ``window``/``overlap``:
    sliding-window evaluation as in ``segment``.
    """

    loss: str = "ssi"
    ssi: str = "trim"
    trim: float = 0.2
    grad_weight: float = 0.5
    grad_scales: int = 4
    space: str | None = None
    silog_lambda: float = 0.85
    silog_sqrt: bool = True
    align: str | None = None
    max_depth: float | None = None
    window: int | None = None
    overlap: float = 1 / 3


@register_objective("depth", DepthConfig)
class Depth(Objective):
    """Monocular depth: MiDaS's SSI loss (+ gradient matching) or the scale-invariant log loss.

    ``batch["depth"]`` (B, H, W) in metres, 0 where unknown (never counted). The model maps
    (B, 3, H, W) to (B, 1, H, W): depth, or disparity with ``space="disparity"``.
    """

    def __init__(self, model: nn.Module, cfg: DepthConfig | None = None):
        super().__init__()
        cfg = cfg or DepthConfig()
        if cfg.loss not in ("ssi", "silog"):
            raise ConfigError(f"objective.loss={cfg.loss!r} is not one of ssi, silog")
        if cfg.ssi not in SSI_VARIANTS:
            raise ConfigError(f"objective.ssi={cfg.ssi!r} is not one of {', '.join(SSI_VARIANTS)}")
        if not 0 <= cfg.trim < 1 or cfg.grad_weight < 0 or cfg.grad_scales < 1:
            raise ConfigError(
                f"objective.trim must be in [0, 1), grad_weight >= 0 and grad_scales >= 1; got {cfg.trim}, "
                f"{cfg.grad_weight}, {cfg.grad_scales}"
            )
        space = cfg.space or ("disparity" if cfg.loss == "ssi" else "depth")
        if space not in ("depth", "disparity") or (cfg.loss == "silog" and space != "depth"):
            raise ConfigError(f"objective.space={space!r}: use depth or disparity (silog works on depth only)")
        self.model, self.cfg, self.space = model, cfg, space
        self.align = cfg.align or ("scale_shift" if cfg.loss == "ssi" else "none")
        self.evaluator()  # a bad align fails at build time, not at the first evaluation

    @classmethod
    def from_config(cls, model: nn.Module, cfg: DepthConfig, **_) -> Depth:
        return cls(model, cfg)

    def target(self, depth: Tensor) -> tuple[Tensor, Tensor]:
        """(target in the model's space, valid mask) for metric ``depth`` (B, H, W)."""
        valid = depth > 0
        if self.space == "disparity":
            return torch.where(valid, 1 / depth.clamp_min(1e-12), torch.zeros_like(depth)), valid
        return depth, valid

    def forward(self, batch: dict) -> dict[str, Tensor]:
        depth = batch["depth"].float()
        pred = self.model(batch["image"]).float()
        if pred.shape[-2:] != depth.shape[-2:] or pred.reshape(depth.shape[0], -1).shape[1] != depth[0].numel():
            raise ConfigError(
                f"the model's output {tuple(pred.shape)} does not match the depth map {tuple(depth.shape)}: a depth "
                "model must return (B, 1, H, W) at its input size"
            )
        target, valid = self.target(depth)
        c = self.cfg
        if c.loss == "silog":
            return {"loss": silog_loss(pred, target, valid, c.silog_lambda, c.silog_sqrt)}
        ssi = ssi_loss(pred, target, valid, c.ssi, c.trim)
        out = {"loss": ssi}
        if c.grad_weight:
            reg = gradient_matching_loss(pred, target, valid, c.ssi, c.grad_scales)
            out = {"loss": ssi + c.grad_weight * reg, "ssi": ssi.detach(), "grad": reg.detach()}
        return out

    def evaluator(self) -> DepthEvaluator:
        return DepthEvaluator(self.align, self.space, self.cfg.max_depth)

    @torch.no_grad()
    def eval_outputs(self, batch: dict, model: nn.Module | None = None) -> dict[str, Tensor]:
        size = batch.get("size")
        if "depth" in batch:
            _check_padding(batch["depth"], size, 0, "depth")
        model = model if model is not None else self.model
        return {"depth": _per_sample(model, batch["image"], size, self.cfg.window, self.cfg.overlap)}

    def papers(self) -> list[str]:
        """The papers this objective's loss and evaluation follow."""
        return [PAPERS[self.cfg.loss]] + ([PAPERS["slide"]] if self.cfg.window else [])
