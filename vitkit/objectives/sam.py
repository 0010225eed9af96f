"""Promptable segmentation (``sam``): SAM's interactive training with simulated clicks.

Per image, up to ``max_masks`` instances are prompted (SAM samples 64 masks per GPU image). The
first prompt of each is a point drawn uniformly inside the mask or its box with SAM's noise
(``box_prob`` 0.5 each), decoded with three output masks; then ``iters - 1`` correction rounds
follow: each adds one click drawn uniformly from the error region of the previous prediction
(foreground where it missed, background where it spilled over) and passes the previous low-res
mask logits as the mask input, except ``mask_only_rounds`` rounds that add no click (SAM: two,
one at a random place among the clicks and one at the end; 11 rounds in all). Later rounds
predict one mask. The previous mask (the one with the highest predicted IoU, as a user would
see it) is detached: no gradient flows between rounds (the paper does not say; SAM 2's training
code lets it flow through the mask prompt).

Loss of a round: focal (Lin et al., alpha 0.25, gamma 2) and Dice in the ratio 20:1 on the
mask with the lowest such loss among the three (first round) or the single mask, plus the mean
squared error between every predicted IoU and the IoU of that mask with the ground truth.
Rounds are averaged. Every mask of a round is one thing: the low-res logits (4h x 4w of the
h x w embedding) upsampled bilinearly to the input frame, as SAM's postprocessing does, and
thresholded at 0 inside the unpadded image. The focal and Dice terms compare those logits with
the ground truth in the input frame (as SAM 2's training code does; ``loss_resolution="low"``
compares the low-res logits with the ground truth area-resampled to them instead, 16 times
less memory at SAM's 4x); the IoU target, the correction clicks and the metric all use that
same binary mask, so the IoU head learns the IoU the metric scores.

Evaluation (``point_miou``, the primary, higher is better): one click per instance at the point
farthest from its boundary, three masks, the one with the highest predicted IoU scored by IoU
with the ground truth in the input frame; ``point_miou_oracle`` scores the best of the three;
``box_miou`` prompts with the tight box and keeps the top predicted mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..detect.criterion import focal_terms
from ..engine.distributed import all_reduce_sum
from ..engine.evaluators import Evaluator
from ..errors import ConfigError, DataError
from ..sam.prompts import center_point, error_point, mask_box, sample_point
from .base import Objective
from .registry import register_objective


@dataclass
class SamConfig:
    """``objective.*`` keys of ``sam``.

    ``max_masks``: instances prompted per image (SAM: 64). ``iters``: prompt rounds per instance,
    the first included (SAM: 11); ``mask_only_rounds`` of the later ones add no click (SAM: 2; at
    most ``iters - 1``: with ``iters=2`` the one later round adds only the mask).
    ``box_prob``: chance that the first prompt is a box rather than a point. ``box_noise``,
    ``box_max_noise``: the box noise's standard deviation as a fraction of the side, and its
    bound in pixels (SAM: 0.1, 20). ``focal_weight``, ``dice_weight``, ``iou_weight``: the terms'
    weights (SAM: 20, 1, 1). ``focal_alpha``, ``focal_gamma``: Lin et al.'s defaults.
    ``loss_resolution``: ``"input"`` (the masks' logits upsampled to the input frame, SAM 2's
    training code) or ``"low"`` (the decoder's low-res logits against the ground truth
    area-resampled to them: less memory for large inputs and many masks).
    """

    max_masks: int = 64
    iters: int = 11
    mask_only_rounds: int = 2
    box_prob: float = 0.5
    box_noise: float = 0.1
    box_max_noise: float = 20.0
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    loss_resolution: str = "input"


LOSS_RESOLUTIONS = ("input", "low")


def mask_focal(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss of each mask, averaged over its pixels: (..., H, W) -> (...)."""
    return focal_terms(logits, target, alpha, gamma).flatten(-2).mean(-1)


def mask_dice(logits: Tensor, target: Tensor) -> Tensor:
    """Soft Dice loss of each mask on its sigmoid, DETR's form 1 - (2 p.g + 1) / (sum p + sum g + 1): (...)."""
    p = logits.sigmoid().flatten(-2)
    g = target.flatten(-2)
    return 1 - (2 * (p * g).sum(-1) + 1) / (p.sum(-1) + g.sum(-1) + 1)


def mask_iou(pred: Tensor, target: Tensor) -> Tensor:
    """IoU of bool masks (..., H, W) -> (...); 1 where both are empty."""
    inter = (pred & target).flatten(-2).sum(-1).float()
    union = (pred | target).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _instances(batch: dict) -> list[Tensor]:
    try:
        return [m.bool() for m in batch["instance_masks"]]
    except KeyError:
        raise DataError(
            f"a promptable batch needs 'instance_masks', this one has {sorted(batch)}: train SAM on instance masks "
            "(a COCO JSON with 'segmentation', images/ + instances/ PNGs, or scenes with --task promptable)"
        ) from None


def valid_region(images: Tensor, input_size: Tensor | None) -> Tensor:
    """(B, 1, S, S) float, 1 on each image's unpadded input (``input_size`` (B, 2) (h, w))."""
    B, _, H, W = images.shape
    if input_size is None:
        return images.new_ones(B, 1, H, W)
    s = input_size.to(images.device)
    rows = torch.arange(H, device=images.device).view(1, H, 1) < s[:, 0].view(B, 1, 1)
    cols = torch.arange(W, device=images.device).view(1, 1, W) < s[:, 1].view(B, 1, 1)
    return (rows & cols).unsqueeze(1).to(images.dtype)


def upscale(low_res: Tensor, size: tuple[int, int]) -> Tensor:
    """Low-res mask logits (P, M, h, w) -> (P, M, *size), bilinear as SAM's postprocessing."""
    return F.interpolate(low_res.float(), size, mode="bilinear", align_corners=False)


@register_objective("sam", SamConfig)
class Sam(Objective):
    """Trains a promptable segmentation model (:class:`vitkit.sam.Sam`) with simulated interactive prompts.

    Args:
        model: ``encode_image(images)``, ``decode(emb, points, boxes, mask_input, multimask)``.
        seed: seeds the prompt draws; with the count of training batches seen (saved with the
            objective) it fixes every prompt, so a resumed run draws what the uninterrupted one did.
        the rest: see :class:`SamConfig`.
    """

    def __init__(self, model: nn.Module, cfg: SamConfig | None = None, seed: int = 0):
        super().__init__()
        cfg = cfg or SamConfig()
        for fn in ("encode_image", "decode"):
            if not callable(getattr(model, fn, None)):
                raise ConfigError(f"objective.name=sam trains a promptable model (vitkit.sam.create_sam), but "
                                  f"{type(model).__name__} has no {fn}(): set model.name to a SAM model")
        if cfg.max_masks < 1 or cfg.iters < 1:
            raise ConfigError(f"objective.max_masks and objective.iters must be >= 1, got {cfg.max_masks}, {cfg.iters}")
        if cfg.mask_only_rounds < 0:
            raise ConfigError(f"objective.mask_only_rounds must be >= 0, got {cfg.mask_only_rounds}")
        if not 0.0 <= cfg.box_prob <= 1.0:
            raise ConfigError(f"objective.box_prob must be in [0, 1], got {cfg.box_prob}")
        if cfg.loss_resolution not in LOSS_RESOLUTIONS:
            raise ConfigError(f"objective.loss_resolution must be one of {', '.join(LOSS_RESOLUTIONS)}, "
                              f"got {cfg.loss_resolution!r}")
        self.model, self.cfg, self.seed = model, cfg, int(seed)
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, model: nn.Module, cfg: SamConfig, *, seed: int = 0, **_) -> Sam:
        return cls(model, cfg, seed)

    # ------------------------------------------------------------------ training
    def _generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + int(self.draws))
        if self.training:
            self.draws += 1
        return g

    def _plan_rounds(self, g: torch.Generator) -> list[bool]:
        """For rounds 1..iters-1: True where the round adds a click, False where it adds only the mask."""
        later = self.cfg.iters - 1
        clicks = [True] * later
        k = min(self.cfg.mask_only_rounds, later)
        if k:
            clicks[-1] = False
            free = torch.randperm(later - 1, generator=g)[: k - 1].tolist() if later > 1 else []
            for i in free:
                clicks[i] = False
        return clicks

    def _pick(self, masks: list[Tensor], g: torch.Generator) -> tuple[Tensor, Tensor]:
        """(image index (P,), gt masks (P, S, S)) of the prompted instances: up to max_masks per image."""
        idx, gts = [], []
        for b, m in enumerate(masks):
            m = m[m.flatten(1).any(1)] if len(m) else m
            if len(m) > self.cfg.max_masks:
                m = m[torch.randperm(len(m), generator=g)[: self.cfg.max_masks].to(m.device)]
            idx += [b] * len(m)
            gts.append(m)
        if not idx:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0)
        return torch.tensor(idx, dtype=torch.long), torch.cat(gts)

    def _round_loss(self, low: Tensor, iou_pred: Tensor, gt: Tensor,
                    inside: Tensor) -> tuple[Tensor, dict, Tensor, Tensor]:
        """One round: ``low`` (P, M, 4h, 4w) mask logits and ``iou_pred`` (P, M) for the ground truth ``gt``
        (P, S, S) bool in the input frame, whose unpadded region is ``inside`` (P, S, S) bool.

        Returns the loss, the logged parts, the mask shown (the highest predicted IoU) (P,) and that
        mask binarised in the input frame (P, S, S) bool, where the next click is placed."""
        c = self.cfg
        if c.loss_resolution == "input":
            logits = upscale(low, tuple(gt.shape[-2:]))
            target = gt
            up = logits.detach()
        else:
            logits = low.float()
            target = F.interpolate(gt[:, None].float(), tuple(low.shape[-2:]), mode="area")[:, 0] > 0.5
            up = upscale(low.detach(), tuple(gt.shape[-2:]))
        target = target[:, None].expand_as(logits).float()
        focal = mask_focal(logits, target, c.focal_alpha, c.focal_gamma)  # (P, M)
        dice = mask_dice(logits, target)
        per_mask = c.focal_weight * focal + c.dice_weight * dice
        best = per_mask.argmin(1)
        rows = torch.arange(len(low), device=low.device)
        # The binary mask a user is shown and the metric scores: upsampled, thresholded, the padding cut.
        pred = (up > 0) & inside[:, None]
        true_iou = mask_iou(pred, gt[:, None].expand_as(pred))
        iou_mse = F.mse_loss(iou_pred.float(), true_iou)
        loss = per_mask[rows, best].mean() + c.iou_weight * iou_mse
        shown = iou_pred.detach().argmax(1)
        parts = {"focal": focal[rows, best].mean().detach(), "dice": dice[rows, best].mean().detach(),
                 "iou_mse": iou_mse.detach(), "miou": true_iou[rows, shown].mean()}
        return loss, parts, shown, pred[rows, shown]

    def forward(self, batch: dict) -> dict[str, Tensor]:
        c = self.cfg
        images = batch["image"]
        valid = valid_region(images, batch.get("input_size"))
        images = images * valid  # SAM pads after normalising: the padding is zero
        g = self._generator()
        img_idx, gt = self._pick(_instances(batch), g)
        emb = self.model.encode_image(images)
        if len(img_idx) == 0:  # nothing to prompt in this batch: a zero loss that keeps the graph
            zero = emb.sum() * 0.0
            return {"loss": zero, "n_masks": zero.detach()}
        img_idx, gt = img_idx.to(emb.device), gt.to(emb.device)
        P = len(gt)
        inside = valid[img_idx, 0] > 0  # (P, S, S)
        is_box = torch.rand(P, generator=g) < c.box_prob
        boxes = mask_box(gt, c.box_noise, c.box_max_noise, generator=g)
        coords = sample_point(gt, generator=g)[:, None]  # (P, 1, 2)
        labels = torch.ones(P, 1, dtype=torch.long, device=gt.device)
        labels[is_box.to(gt.device)] = -1  # a box prompt starts without a click
        groups = [(grp, bool(b)) for b in (False, True) if len(grp := torch.nonzero(is_box == b).squeeze(1))]
        mask_in: Tensor | None = None
        shown_pred: Tensor | None = None
        losses, stats = [], []
        for r, click in enumerate([True] + self._plan_rounds(g)):
            if r > 0 and click:
                xy, lab = error_point(shown_pred, gt, generator=g)
                coords = torch.cat([coords, xy[:, None]], 1)
                labels = torch.cat([labels, lab[:, None]], 1)
            outs = []
            for grp, boxed in groups:
                gd = grp.to(emb.device)
                pts = None if (r == 0 and boxed) else (coords[gd], labels[gd])
                out_low, out_iou = self.model.decode(
                    emb[img_idx[gd]], points=pts, boxes=boxes[gd] if boxed else None,
                    mask_input=None if mask_in is None else mask_in[gd], multimask=r == 0)
                outs.append((gd, out_low, out_iou))
            # Back to prompt order: the groups are disjoint index sets covering 0..P-1.
            order = torch.cat([o[0] for o in outs])
            inv = torch.empty_like(order)
            inv[order] = torch.arange(len(order), device=order.device)
            low = torch.cat([o[1] for o in outs])[inv]
            iou = torch.cat([o[2] for o in outs])[inv]
            loss, parts, shown, shown_pred = self._round_loss(low, iou, gt, inside)
            losses.append(loss)
            stats.append(parts)
            mask_in = low[torch.arange(P, device=low.device), shown][:, None].detach()
        out = {"loss": torch.stack(losses).mean()}
        for k in ("focal", "dice", "iou_mse"):
            out[k] = torch.stack([s[k] for s in stats]).mean()
        out["miou_first"], out["miou_last"] = stats[0]["miou"], stats[-1]["miou"]
        out["n_masks"] = torch.tensor(float(P), device=emb.device)
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluator(self) -> Evaluator:
        return InstanceMIoUEvaluator()

    @torch.no_grad()
    def eval_outputs(self, batch: dict, model: nn.Module | None = None) -> dict:
        model = model if model is not None else self.model
        return prompt_scores(model, batch["image"], _instances(batch), batch.get("input_size"))

    def papers(self) -> list[str]:
        return ["Kirillov et al. 2023, Segment Anything (interactive training with simulated clicks)"]


@torch.no_grad()
def prompt_scores(model: nn.Module, images: Tensor, masks: list[Tensor], input_size: Tensor | None = None) -> dict:
    """Per image: the summed IoU of the top predicted mask for a center click (``point``), of the best of
    three (``point_oracle``) and of the top mask for the tight box (``box``), and the instance count.

    ``images`` are normalised (B, 3, S, S); ``masks`` one bool (K, S, S) stack per image in the input frame.
    """
    valid = valid_region(images, input_size)
    emb = model.encode_image(images * valid)
    B, S = len(images), images.shape[-1]
    sums = {k: torch.zeros(B, device=images.device, dtype=torch.float64)
            for k in ("point_iou_sum", "point_oracle_sum", "box_iou_sum", "count")}
    for b, m in enumerate(masks):
        m = m.to(images.device)
        m = m[m.flatten(1).any(1)] if len(m) else m
        if not len(m):
            continue
        inside = valid[b, 0] > 0
        pts = center_point(m)[:, None]
        lab = torch.ones(len(m), 1, dtype=torch.long, device=m.device)
        for key, kw in (("point", {"points": (pts, lab)}), ("box", {"boxes": mask_box(m, 0.0)})):
            low, iou = model.decode(emb[b:b + 1], mask_input=None, multimask=True, **kw)
            pred = (upscale(low, (S, S)) > 0) & inside
            ious = mask_iou(pred, m[:, None].expand_as(pred))  # (K, M)
            top = ious.gather(1, iou.argmax(1, keepdim=True)).squeeze(1)
            sums[f"{key}_iou_sum"][b] = top.sum().double()
            if key == "point":
                sums["point_oracle_sum"][b] = ious.max(1).values.sum().double()
        sums["count"][b] = float(len(m))
    return sums


class InstanceMIoUEvaluator(Evaluator):
    """mIoU over every instance of the set (not per image): ``point_miou`` (primary), ``point_miou_oracle``,
    ``box_miou``, and ``n_instances``, from the sums :func:`prompt_scores` gives."""

    primary = "point_miou"
    higher_is_better = True

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: Tensor | None = None

    def update(self, batch: dict, outputs: dict) -> None:
        packed = torch.stack([outputs[k].double().sum() for k in
                              ("point_iou_sum", "point_oracle_sum", "box_iou_sum", "count")])
        self.sums = packed if self.sums is None else self.sums + packed

    def compute(self) -> dict[str, float]:
        sums = all_reduce_sum(self.sums if self.sums is not None else torch.zeros(4, dtype=torch.float64))
        n = sums[3].item()
        if n == 0:
            return {}
        return {"point_miou": sums[0].item() / n, "point_miou_oracle": sums[1].item() / n,
                "box_miou": sums[2].item() / n, "n_instances": n}
