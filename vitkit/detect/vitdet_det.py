"""The ViTDet detector: a plain ViT, ViTDet's simple feature pyramid and an FCOS head.

Backbone and pyramid follow Li et al., 2022 ("Exploring Plain Vision Transformer Backbones for
Object Detection"): the last map of the ViT (stride 16 for patch 16) becomes the levels at
strides 8/16/32 by a stride-2 deconvolution, the identity and a 2x2 max pool, each followed by a
1x1 and a 3x3 conv with LayerNorm; stride 64 is the max-pool subsampling of the stride-32
level (their top block). A hierarchical backbone (Swin, PVT, ConvNeXt, ...) gives its own maps
at those strides instead (a missing one: the nearest finer map, max-pooled), with the same
1x1/3x3 convs on top.

The head is FCOS (Tian et al., 2019; "FCOS: A Simple and Strong Anchor-free Object Detector",
2020) with the improvements of its reference code: shared 4-conv GroupNorm towers for
classification and regression, sigmoid focal classification (alpha 0.25, gamma 2, prior 0.01),
distances to the four box sides (l, t, r, b) in units of the level's stride through a learned
per-level scale and a ReLU, GIoU loss weighted by the centerness target, centerness predicted
on the regression tower, center sampling (radius 1.5 strides), per-level size ranges, and the
smallest box where a location falls inside several. Detections score sqrt(class * centerness).

It is anchor-free (no anchor sizes or ratios to tune for unseen data) and every location inside
an object is a positive, which suits small datasets better than a set loss with one match per box.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dense.model import freeze_unused
from ..engine.distributed import all_reduce_sum, get_world_size
from ..errors import ConfigError, DataError
from ..layers.norm import LayerNorm2d
from ..layers.pyramid import pyramid_plan
from .base import Detector
from .criterion import sigmoid_focal_loss
from .nms import batched_nms
from .registry import register_detector

PAPER_FCOS = "FCOS: Fully Convolutional One-Stage Object Detection (Tian et al., 2019)"
PAPER_VITDET = "Exploring Plain Vision Transformer Backbones for Object Detection (Li et al., 2022)"

# ViTDet builds levels up to stride 32 from the backbone; coarser ones come from its top block.
_MAX_BUILT_STRIDE = 32
_INF = float("inf")


# ---------------------------------------------------------------------- FCOS targets and losses
def default_size_ranges(strides: tuple[int, ...]) -> list[tuple[float, float]]:
    """FCOS's per-level ranges of the largest box-side distance: level i takes (8 * stride_{i-1},
    8 * stride_i], the first from 0 and the last to infinity (64/128/256/512 for P3-P7)."""
    bounds = [8.0 * s for s in strides[:-1]]
    return list(zip([-1.0] + bounds, bounds + [_INF]))


def level_locations(sizes: list[tuple[int, int]], strides: tuple[int, ...], device=None) -> tuple[Tensor, Tensor]:
    """The (x, y) pixel centre of every position of every level, ``(N, 2)``, and its level (N,).

    Position (i, j) of a stride-s map sits at ``(j * s + s // 2, i * s + s // 2)``, as in FCOS;
    levels are concatenated finest first, each row-major.
    """
    locs, levels = [], []
    for k, ((h, w), s) in enumerate(zip(sizes, strides)):
        ys = torch.arange(h, device=device, dtype=torch.float32) * s + s // 2
        xs = torch.arange(w, device=device, dtype=torch.float32) * s + s // 2
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        locs.append(torch.stack((x.reshape(-1), y.reshape(-1)), dim=1))
        levels.append(torch.full((h * w,), k, device=device, dtype=torch.int64))
    return torch.cat(locs), torch.cat(levels)


def fcos_targets(locations: Tensor, strides: Tensor, ranges: Tensor, boxes: Tensor, labels: Tensor,
                 num_classes: int, center_radius: float = 1.5) -> tuple[Tensor, Tensor]:
    """FCOS's assignment for one image: the class (``num_classes`` = background) and the (l, t,
    r, b) pixel distances of each location.

    ``locations`` (N, 2) xy pixels, ``strides`` (N,) their level's stride, ``ranges`` (N, 2) their
    level's size range, ``boxes`` (K, 4) xyxy pixels, ``labels`` (K,). A location is a candidate
    for a box when it lies inside the box (with ``center_radius`` > 0: inside the box clipped to
    ``center_radius * stride`` around its centre) and the box's largest distance from it falls
    in its level's range; among several candidates it takes the box of smallest area.
    """
    n = locations.shape[0]
    if boxes.numel() == 0:
        return (torch.full((n,), num_classes, dtype=torch.int64, device=locations.device),
                torch.zeros(n, 4, device=locations.device))
    boxes = boxes.to(locations)
    xs, ys = locations[:, 0, None], locations[:, 1, None]
    x1, y1, x2, y2 = boxes.unbind(1)
    reg = torch.stack((xs - x1, ys - y1, x2 - xs, y2 - ys), dim=2)  # (N, K, 4)
    if center_radius > 0:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        r = strides.to(locations)[:, None] * center_radius
        inner = torch.stack((xs - torch.maximum(cx - r, x1), ys - torch.maximum(cy - r, y1),
                             torch.minimum(cx + r, x2) - xs, torch.minimum(cy + r, y2) - ys), dim=2)
        inside = inner.min(dim=2).values > 0
    else:
        inside = reg.min(dim=2).values > 0
    largest = reg.max(dim=2).values
    in_range = (largest >= ranges[:, 0, None]) & (largest <= ranges[:, 1, None])
    area = ((x2 - x1) * (y2 - y1))[None].expand(n, -1)
    area = torch.where(inside & in_range, area, torch.full_like(area, _INF))
    best, idx = area.min(dim=1)  # ties: the first box, as torch.min returns the first minimum
    cls = labels.to(locations.device, torch.int64)[idx]
    cls[best == _INF] = num_classes
    return cls, reg[torch.arange(n, device=locations.device), idx]


def centerness_target(ltrb: Tensor) -> Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of positive locations' distances."""
    lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]
    return torch.sqrt((lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values))


def giou_loss_ltrb(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """1 - GIoU of boxes given by distances (l, t, r, b) from the same location, (N,)."""
    p_area = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    t_area = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    lo, hi = torch.minimum(pred, target), torch.maximum(pred, target)
    inter = (lo[:, 0] + lo[:, 2]) * (lo[:, 1] + lo[:, 3])
    hull = (hi[:, 0] + hi[:, 2]) * (hi[:, 1] + hi[:, 3]) + eps
    union = p_area + t_area - inter + eps
    return 1 - (inter / union - (hull - union) / hull)


def focal_loss_sum(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (Lin et al., 2017) of 0/1 ``targets``, summed over every location and
    class (FCOS divides the sum by the positives itself)."""
    # sigmoid_focal_loss averages over dim 1 before summing; dividing by 1 / its size undoes that.
    return sigmoid_focal_loss(logits, targets, 1.0 / logits.shape[1], alpha, gamma)


# ---------------------------------------------------------------------- pyramid and head
def _conv_ln(in_chs: int, out_chs: int, k: int) -> nn.Sequential:
    conv = nn.Conv2d(in_chs, out_chs, k, padding=k // 2, bias=False)
    # detectron2's c2_xavier_fill, as ViTDet initialises the pyramid's convs.
    nn.init.kaiming_uniform_(conv.weight, a=1)
    return nn.Sequential(conv, LayerNorm2d(out_chs, eps=1e-6))


def _rescale(dim: int, scale: float) -> tuple[nn.Module, int]:
    """ViTDet's resampling of the last map: stride-2 deconvolutions up (LayerNorm + GELU
    between two), max pooling down. Returns the module and its output channels."""
    if scale == 1:
        return nn.Identity(), dim
    if scale < 1:
        k = round(1 / scale)
        return nn.MaxPool2d(k, k, ceil_mode=True), dim
    steps = round(math.log2(scale))
    layers, chs = [], dim
    for i in range(steps):
        if i:
            layers += [LayerNorm2d(chs, eps=1e-6), nn.GELU()]
        layers.append(nn.ConvTranspose2d(chs, chs // 2, 2, 2))
        chs //= 2
    return nn.Sequential(*layers), chs


class SimpleFeaturePyramid(nn.Module):
    """The levels at ``strides`` from a vitkit backbone (see the module docstring)."""

    def __init__(self, backbone: nn.Module, strides: tuple[int, ...], channels: int):
        super().__init__()
        info = backbone.pyramid_info()
        name = type(backbone).__name__
        self.strides = tuple(strides)
        built = [s for s in self.strides if s <= _MAX_BUILT_STRIDE]
        if not built or any(b != a * 2 for a, b in zip(self.strides, self.strides[1:])):
            raise ConfigError(
                f"vitdet_fcos: strides must double from level to level and start at most at {_MAX_BUILT_STRIDE} "
                f"(the paper's are 8, 16, 32, 64), got {list(strides)}"
            )
        # A plain ViT's pyramid is its last map resampled: ViTDet learns that resampling from the map
        # itself. A hierarchical backbone gives a map per stride; missing strides come from the
        # nearest finer one (vitkit's pyramid plan).
        self.isotropic = len({f["module"] for f in info}) == 1
        srcs = [backbone.feature_info[-1]] if self.isotropic else info
        self.sources = []
        self.stages = nn.ModuleList()
        for s, (i, scale) in zip(built, pyramid_plan([f["reduction"] for f in srcs], tuple(built))):
            red, dim = srcs[i]["reduction"], srcs[i]["num_chs"]
            if scale > 1 and (scale != 2 ** round(math.log2(scale)) or dim % round(scale)):
                raise ConfigError(
                    f"vitdet_fcos: {name}'s finest map has stride {red}; stride {s} would need an upsampling by "
                    f"{scale}, which the simple pyramid does by powers of two. Use strides at or above {red} / 4"
                )
            if scale < 1 and Fraction(1 / scale).denominator != 1:
                raise ConfigError(f"vitdet_fcos: stride {s} is not a whole multiple of {name}'s stride {red}")
            resample, chs = _rescale(dim, scale)
            self.sources.append(i)
            self.stages.append(nn.Sequential(resample, _conv_ln(chs, channels, 1), _conv_ln(channels, channels, 3)))
        self.num_top = len(self.strides) - len(built)
        # Inputs padded to the coarsest built stride (and the backbone's own multiple) tile every level.
        multiple = _MAX_BUILT_STRIDE if self.num_top else built[-1]
        for f in backbone.feature_info:
            multiple = math.lcm(multiple, Fraction(f["reduction"]).limit_denominator(64).numerator)
        self.input_multiple = multiple

    def forward(self, backbone: nn.Module, x: Tensor) -> list[Tensor]:
        if self.isotropic:
            maps = backbone.forward_intermediates(x, indices=1, intermediates_only=True)
        else:
            maps = backbone.forward_intermediates(x, pyramid=True, intermediates_only=True)
        outs = [stage(maps[i]) for stage, i in zip(self.stages, self.sources)]
        for _ in range(self.num_top):
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return outs


class Scale(nn.Module):
    """A learned scalar per level (FCOS shares the head across levels of different sizes)."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(channels: int, num_convs: int) -> nn.Sequential:
    # FCOS's 32 groups; narrow heads keep two channels per group, so that the 1x1 top level of a
    # small image never normalises a single value.
    groups = math.gcd(32, channels // 2 if channels < 64 else channels) or 1
    layers = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """FCOS's head shared by all levels: per level (B, C, h, w) class logits, (B, 4, h, w) raw
    distances (before scale, ReLU and stride) and (B, 1, h, w) centerness logits."""

    def __init__(self, channels: int, num_classes: int, num_levels: int, num_convs: int = 4, prior_prob: float = 0.01):
        super().__init__()
        self.cls_tower = _tower(channels, num_convs)
        self.bbox_tower = _tower(channels, num_convs)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0)
        # The prior keeps the many background locations from swamping the first updates.
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        cls, box, ctr = [], [], []
        for f, scale in zip(feats, self.scales):
            c, b = self.cls_tower(f), self.bbox_tower(f)
            cls.append(self.cls_logits(c))
            box.append(scale(self.bbox_pred(b)))
            ctr.append(self.centerness(b))
        return cls, box, ctr


def _flat(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C), row-major positions."""
    return x.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------- the detector
@register_detector("vitdet_fcos", default_backbone="vitdet_small_patch16_224")
class ViTDetFCOS(Detector):
    """ViTDet's plain backbone and simple pyramid with an FCOS head (see the module docstring).

    Args:
        backbone: a vitkit backbone name (built with ``create_model(name, num_classes=0,
            **backbone_args)``) or a built backbone; any backbone with ``pyramid_info()`` works.
        num_classes: object classes (no background class).
        strides: pyramid levels (8, 16, 32, 64 as ViTDet's P3-P6).
        channels: width of the pyramid and the head (256 in both papers).
        num_convs: convs per tower (4).
        size_ranges: per level (low, high] of a location's largest box-side distance; None: FCOS's
            (8 x the previous stride, 8 x the stride], the last open-ended.
        center_radius: center sampling radius in strides (1.5; 0 turns it off: the whole box).
        focal_alpha, focal_gamma, prior_prob: the focal loss (0.25, 2) and its bias prior (0.01).
        score_thresh, pre_nms_top_n, nms_thresh: inference (0.05 on the class probability, top
            1000 per level, class-wise NMS at IoU 0.6).

    ``forward`` returns ``"pred_logits"`` (B, N, num_classes) class logits, ``"pred_ltrb"`` (B, N, 4)
    non-negative distances in input pixels from each location to the box's left, top, right
    and bottom sides, ``"pred_centerness"`` (B, N) logits, ``"locations"`` (N, 2) xy pixel centres
    and ``"levels"`` (N,) level indices, over the N positions of all levels (finest first, each
    row-major).
    """

    def __init__(self, backbone: str | nn.Module, num_classes: int, *, strides: tuple[int, ...] = (8, 16, 32, 64),
                 channels: int = 256, num_convs: int = 4, size_ranges: list | None = None,
                 center_radius: float = 1.5, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 prior_prob: float = 0.01, score_thresh: float = 0.05, pre_nms_top_n: int = 1000,
                 nms_thresh: float = 0.6, backbone_args: dict | None = None):
        super().__init__()
        if isinstance(backbone, str):
            from ..models import create_model

            backbone = create_model(backbone, num_classes=0, **(backbone_args or {}))
        elif backbone_args:
            raise ConfigError("vitdet_fcos: backbone_args apply to a backbone given by name; this one is already built")
        if not callable(getattr(backbone, "pyramid_info", None)):
            raise ConfigError(
                f"vitdet_fcos needs a vitkit backbone with a feature pyramid (pyramid_info()); "
                f"{type(backbone).__name__} has none"
            )
        if num_classes < 1 or channels < 1 or num_convs < 0 or center_radius < 0:
            raise ConfigError(
                f"vitdet_fcos: num_classes and channels must be >= 1, num_convs and center_radius >= 0; got "
                f"{num_classes}, {channels}, {num_convs}, {center_radius}"
            )
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.strides = tuple(int(s) for s in strides)
        ranges = default_size_ranges(self.strides) if size_ranges is None else [tuple(map(float, r)) for r in size_ranges]
        if len(ranges) != len(self.strides) or any(len(r) != 2 or r[0] >= r[1] for r in ranges):
            raise ConfigError(
                f"vitdet_fcos: size_ranges needs one (low, high) with low < high per level ({len(self.strides)}), got {size_ranges}"
            )
        self.register_buffer("size_ranges", torch.tensor(ranges, dtype=torch.float32), persistent=False)
        self.neck = SimpleFeaturePyramid(backbone, self.strides, channels)
        self.head = FCOSHead(channels, self.num_classes, len(self.strides), num_convs, prior_prob)
        self.stride = self.neck.input_multiple
        self.center_radius = float(center_radius)
        self.focal_alpha, self.focal_gamma = float(focal_alpha), float(focal_gamma)
        self.score_thresh, self.pre_nms_top_n, self.nms_thresh = float(score_thresh), int(pre_nms_top_n), float(nms_thresh)
        self.in_chans = getattr(backbone, "in_chans", 3)
        self._args = dict(strides=list(self.strides), channels=channels, num_convs=num_convs,
                          size_ranges=None if size_ranges is None else [list(r) for r in ranges],
                          center_radius=center_radius, focal_alpha=focal_alpha, focal_gamma=focal_gamma,
                          prior_prob=prior_prob, score_thresh=score_thresh, pre_nms_top_n=pre_nms_top_n,
                          nms_thresh=nms_thresh, backbone_args=dict(backbone_args or {}))
        # Backbone parameters the pyramid never reads (a plain ViT's final norm) would stall DDP and
        # waste optimizer state.
        self.frozen_unused = freeze_unused(self, self.backbone,
                                           lambda x: sum(f.sum() for f in self.neck(self.backbone, x)),
                                           max(self.stride, 32), self.in_chans)

    @property
    def model_args(self) -> dict:
        """``create_detector(**model_args)`` rebuilds this detector (fresh weights; backbone by name)."""
        name = getattr(self.backbone, "model_name", None)
        args = dict(self._args)
        if name is not None and not args["backbone_args"]:
            # A backbone built elsewhere: keep the arguments that differ from its registered config.
            from ..models import get_model_card

            card = get_model_card(name).config
            built = dict(getattr(self.backbone, "model_args", {}) or {})
            built.pop("num_classes", None)
            args["backbone_args"] = {k: v for k, v in built.items() if k not in card or card[k] != v}
        return dict(name=self.detector_name, backbone=name, num_classes=self.num_classes, **args)

    @property
    def group_matcher(self):
        """The backbone's layer groups under ``backbone.`` (pyramid and head form the last group),
        for layer-wise lr decay as ViTDet trains (0.7 for ViT-B); absent when the backbone has none."""
        fn = getattr(self.backbone, "group_matcher", None)
        if not callable(fn):
            raise AttributeError(f"{type(self.backbone).__name__} has no group_matcher")
        from ..dense.model import _prefixed

        def group_matcher(coarse: bool = False) -> dict:
            return {key: [(_prefixed(rx, "backbone."), sfx) for rx, sfx in spec] if isinstance(spec, (list, tuple))
                    else _prefixed(spec, "backbone.") for key, spec in fn(coarse).items()}

        return group_matcher

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's activations in backward instead of storing them."""
        self.backbone.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, pixel_mask: Tensor | None = None) -> dict:
        """Dense FCOS outputs (see the class docstring). Any H, W: the images are padded
        bottom/right with zeros to a multiple of :attr:`stride`. Padded positions are ordinary
        background locations, as in FCOS's batched training, so ``pixel_mask`` is not needed."""
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ConfigError(f"vitdet_fcos expects images (B, {self.in_chans}, H, W), got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        x = F.pad(images, (0, (-W) % self.stride, 0, (-H) % self.stride))
        feats = self.neck(self.backbone, x)
        cls, box, ctr = self.head(feats)
        sizes = [tuple(f.shape[-2:]) for f in feats]
        locations, levels = level_locations(sizes, self.strides, device=images.device)
        # Distances are predicted in strides (scale-free across levels) and returned in pixels.
        ltrb = torch.cat([_flat(F.relu(b)) * s for b, s in zip(box, self.strides)], dim=1)
        return {
            "pred_logits": torch.cat([_flat(c) for c in cls], dim=1),
            "pred_ltrb": ltrb,
            "pred_centerness": torch.cat([_flat(c) for c in ctr], dim=1).squeeze(-1),
            "locations": locations,
            "levels": levels,
        }

    # ------------------------------------------------------------------ loss
    def targets_for(self, outputs: dict, targets: list[dict]) -> tuple[Tensor, Tensor]:
        """FCOS's (B, N) classes (``num_classes``: background) and (B, N, 4) pixel distances."""
        locations, levels = outputs["locations"], outputs["levels"]
        strides = torch.tensor(self.strides, device=locations.device, dtype=torch.float32)[levels]
        ranges = self.size_ranges.to(locations.device)[levels]
        for t in targets:
            labels = torch.as_tensor(t["labels"])
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise DataError(
                    f"vitdet_fcos: target labels must lie in [0, {self.num_classes}) (object classes, no background), "
                    f"got {sorted(set(labels.tolist()))}: check the dataset's classes against num_classes"
                )
        cls, reg = zip(*(fcos_targets(locations, strides, ranges, t["boxes"], t["labels"], self.num_classes,
                                      self.center_radius) for t in targets))
        return torch.stack(cls), torch.stack(reg)

    def loss(self, outputs: dict, targets: list[dict]) -> dict:
        """FCOS's loss: focal classification over all locations and centerness BCE over the
        positives, both per positive; GIoU weighted by the centerness target, per unit of it.
        Both normalisers are averaged over processes under DDP, as the reference does."""
        logits = outputs["pred_logits"].float()
        ltrb = outputs["pred_ltrb"].float()
        ctr = outputs["pred_centerness"].float()
        if len(targets) != logits.shape[0]:
            raise ConfigError(f"vitdet_fcos.loss: {logits.shape[0]} images but {len(targets)} targets")
        cls_t, reg_t = self.targets_for(outputs, targets)
        pos = cls_t < self.num_classes
        onehot = torch.zeros_like(logits)
        onehot[pos, cls_t[pos]] = 1.0
        world = get_world_size()
        num_pos = all_reduce_sum(pos.sum().float().detach().clone())
        num_pos = max(num_pos.item() / world, 1.0)
        loss_cls = focal_loss_sum(logits, onehot, self.focal_alpha, self.focal_gamma) / num_pos
        if pos.any():
            reg_pos = reg_t[pos]
            ctr_t = centerness_target(reg_pos)
            ctr_sum = all_reduce_sum(ctr_t.sum().detach().clone())
            ctr_sum = max(ctr_sum.item() / world, 1e-6)
            loss_giou = (giou_loss_ltrb(ltrb[pos], reg_pos) * ctr_t).sum() / ctr_sum
            loss_ctr = F.binary_cross_entropy_with_logits(ctr[pos], ctr_t, reduction="sum") / num_pos
        else:
            all_reduce_sum(torch.zeros((), device=logits.device))  # keep the collective calls paired
            loss_giou = ltrb.sum() * 0
            loss_ctr = ctr.sum() * 0
        return {"loss": loss_cls + loss_giou + loss_ctr, "loss_cls": loss_cls, "loss_giou": loss_giou,
                "loss_centerness": loss_ctr}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def postprocess(self, outputs: dict, sizes: Tensor, top_k: int = 100) -> list[dict]:
        """Boxes (xyxy pixels of each unpadded input, clipped to it), scores sqrt(class x
        centerness) and labels, best first: per level the top ``pre_nms_top_n`` locations and
        classes whose class probability exceeds ``score_thresh``, then class-wise NMS."""
        probs = torch.sigmoid(outputs["pred_logits"].float())
        ctr = torch.sigmoid(outputs["pred_centerness"].float())
        ltrb = outputs["pred_ltrb"].float()
        locations, levels = outputs["locations"], outputs["levels"]
        results = []
        for b in range(probs.shape[0]):
            h, w = (float(v) for v in sizes[b])
            all_boxes, all_scores, all_labels = [], [], []
            for k in range(len(self.strides)):
                sel = (levels == k).nonzero().squeeze(1)
                p = probs[b, sel]
                cand = p > self.score_thresh
                score = (p * ctr[b, sel, None])[cand]
                loc_idx, lab = cand.nonzero().unbind(1)
                if score.numel() > self.pre_nms_top_n:
                    score, top = score.topk(self.pre_nms_top_n)
                    loc_idx, lab = loc_idx[top], lab[top]
                xy, d = locations[sel[loc_idx]], ltrb[b, sel[loc_idx]]
                all_boxes.append(torch.cat((xy - d[:, :2], xy + d[:, 2:]), dim=1))
                all_scores.append(score)
                all_labels.append(lab)
            boxes = torch.cat(all_boxes)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            scores, labels = torch.cat(all_scores), torch.cat(all_labels)
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[:top_k]
            results.append({"boxes": boxes[keep], "scores": scores[keep].sqrt(), "labels": labels[keep]})
        return results


__all__ = [
    "FCOSHead", "SimpleFeaturePyramid", "ViTDetFCOS", "centerness_target", "default_size_ranges", "fcos_targets",
    "focal_loss_sum", "giou_loss_ltrb", "level_locations",
]
