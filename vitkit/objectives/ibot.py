"""iBOT (Zhou et al., 2022) and DINOv2 (Oquab et al., 2023) pieces on top of DINO.

- **Masked patch prediction** (iBOT): some of the student's global crops have a random share of
  their patch tokens replaced by a mask token (``forward_tokens(token_mask=...)``), in
  rectangular blocks by default (``mask_shape=block``, as iBOT) or patch by patch; at those
  places the student's patch outputs are trained to match the teacher's outputs for the
  unmasked crop (centred and sharpened with their own centre). As in the iBOT paper's code, that
  centre follows the teacher's outputs for every patch token of every global crop
  (``patch_center=all``); ``patch_center=masked`` centres over the masked tokens only, as DINOv2
  and lightly do. Either way the counts are global and an empty batch of masked tokens leaves the
  centre as it was.
- **KoLeo** (DINOv2): ``-mean(log(distance to the nearest neighbour))`` of the student's
  normalised features in a batch, which spreads them out.
- **Sinkhorn-Knopp centring** (SwAV/DINOv2): teacher targets from a few Sinkhorn iterations
  that balance the prototypes over the global batch, instead of the running centre.

Registers and LayerScale come from the backbone (``vit_*_reg*``, ``init_values``). A backbone
whose stem mixes neighbouring patches is refused (the student would see what is masked) unless
``allow_mixing_stem``. The run exports the teacher backbone.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.distributed import all_reduce_sum, is_dist
from ..errors import ConfigError
from .dino import DINO, DINOConfig, _views, dino_loss, sharpen, update_center
from .registry import register_objective
from .ssl import batch_statistics, check_patch_local_stem

_CENTERINGS = ("center", "sinkhorn_knopp")
_MASK_SHAPES = ("block", "random")
_PATCH_CENTERS = ("all", "masked")


@dataclass
class IBOTConfig(DINOConfig):
    """``objective.*`` keys of ``ibot``: DINO's, plus masking, the patch loss, KoLeo and the centring."""

    mask_prob: float = 0.5
    # The patch targets' own temperature, as iBOT's code: 0.04 warmed up to 0.07 over the teacher
    # temperature's warm-up share of the run, while the class token's stays at teacher_temp (0.04).
    warmup_teacher_patch_temp: float = 0.04
    teacher_patch_temp: float = 0.07
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_shape: str = "block"  # block (rectangles of patches) | random (patch by patch)
    patch_loss_weight: float = 1.0
    koleo_weight: float = 0.0
    centering: str = "center"  # center | sinkhorn_knopp
    sinkhorn_iters: int = 3
    # all: the patch centre (or the Sinkhorn-Knopp balance) over every patch token of the teacher,
    # as the iBOT paper's code; masked: over the masked tokens only, as DINOv2 and lightly.
    patch_center: str = "all"
    allow_mixing_stem: bool = False  # train on a stem that mixes patches anyway (it sees what is masked)


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo regulariser of (B, D) features: ``-mean_i log ||x_i - x_nn(i)||`` after L2 normalisation."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sim = x @ x.T
        sim.fill_diagonal_(-2.0)  # never one's own neighbour
        nearest = sim.argmax(1)
    dist_nn = (x - x[nearest]).norm(dim=-1)
    return -torch.log(dist_nn + eps).mean()


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temp: float, n_iters: int = 3) -> Tensor:
    """Balanced soft assignments (N, K) of ``logits`` (N, K) to K prototypes, over every process's rows.

    Each iteration makes every prototype's total mass equal (1/K), then every row's (1/N_global);
    the rows are returned summing to 1. No rows anywhere gives an empty (0, K) result.
    """
    logits = logits.float()
    # A process may hold no rows (no masked token): its shift must not win the maximum.
    top = logits.max().clone() if logits.numel() else logits.new_tensor(float("-inf"))
    if is_dist():  # one shift for every process keeps the normalisations global
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    q = torch.exp((logits - top) / temp).T  # (K, N)
    k = q.shape[0]
    n = all_reduce_sum(torch.tensor(float(q.shape[1]), device=q.device))
    if n == 0:
        return logits.new_zeros(0, k)
    q /= all_reduce_sum(q.sum())
    for _ in range(n_iters):
        q /= all_reduce_sum(q.sum(1, keepdim=True))  # every prototype gets 1/K of the mass
        q /= k
        q /= q.sum(0, keepdim=True)  # every row 1/N
        q /= n
    return (q * n).T


@torch.no_grad()
def update_masked_center(center: Tensor, logits: Tensor, momentum: float) -> None:
    """The centre's EMA over masked tokens (M, K): the global sum over the global count of tokens.

    A step with no masked token on any process leaves the centre as it is (no 0 / 0).
    """
    stats = all_reduce_sum(torch.cat([logits.float().sum(0), logits.new_tensor([logits.shape[0]]).float()]))
    count = stats[-1]
    if count > 0:
        center.mul_(momentum).add_(stats[None, :-1] / count, alpha=1 - momentum)


def random_token_mask(b: int, length: int, prob: float, ratio: tuple[float, float], device=None) -> Tensor:
    """(B, L) bool: with probability ``prob`` a sample has a share uniform in ``ratio`` of its patches masked."""
    share = ratio[0] + (ratio[1] - ratio[0]) * torch.rand(b, device=device)
    count = torch.round(share * length) * (torch.rand(b, device=device) < prob)  # (B,)
    rank = torch.rand(b, length, device=device).argsort(1).argsort(1)  # a random order of the patches
    return rank < count[:, None]


def block_token_mask(b: int, grid: tuple[int, int], prob: float, ratio: tuple[float, float],
                     min_block: int = 4, aspect: float = 0.3, device=None) -> Tensor:
    """(B, H*W) bool, row-major: like :func:`random_token_mask`, but the masked patches form rectangles.

    For each masked sample, rectangles of at least ``min_block`` patches and aspect ratio in
    [aspect, 1/aspect] (log-uniform) are dropped at random places until the sample's share is
    covered (a rectangle must add new patches without overshooting it; after 10 failed tries in
    a row the sample keeps what it has, so a share can fall a few patches short). Randomness
    comes from torch's generator, so a resumed run draws the same masks.
    """
    H, W = grid
    rng = random.Random(int(torch.randint(0, 2**62, ())))
    out = torch.zeros(b, H, W, dtype=torch.bool)
    log_lo = math.log(aspect)
    for i in range(b):
        if rng.random() >= prob:
            continue
        target = round((ratio[0] + (ratio[1] - ratio[0]) * rng.random()) * H * W)
        mask, count, misses = out[i], 0, 0
        while count < target and misses < 10:
            left = target - count
            area = rng.uniform(min(min_block, left), left)
            ar = math.exp(rng.uniform(log_lo, -log_lo))
            h, w = round(math.sqrt(area * ar)), round(math.sqrt(area / ar))
            if not (1 <= h <= H and 1 <= w <= W):
                misses += 1
                continue
            top, lft = rng.randint(0, H - h), rng.randint(0, W - w)
            new = h * w - int(mask[top:top + h, lft:lft + w].sum())
            if 0 < new <= left:
                mask[top:top + h, lft:lft + w] = True
                count, misses = count + new, 0
            else:
                misses += 1
    return out.flatten(1).to(device)


def masked_patch_loss(student: Tensor, teacher_probs: Tensor, weights: Tensor, n_images: int,
                      student_temp: float) -> Tensor:
    """iBOT's patch loss over the M masked tokens: ``sum_m w_m * CE(teacher_m, student_m) / n_images``.

    student: (M, K) logits; teacher_probs: (M, K); weights: (M,) = 1 / (masked tokens of that
    token's image), so each image counts once whatever its number of masked tokens.
    """
    ce = torch.sum(-teacher_probs * F.log_softmax(student.float() / student_temp, dim=-1), dim=-1)  # (M,)
    return (ce * weights).sum() / max(1, n_images)


@register_objective("ibot", IBOTConfig)
class IBOT(DINO):
    """DINO's image-level loss + iBOT's masked patch loss (+ KoLeo, + Sinkhorn-Knopp centring)."""

    def __init__(self, model: nn.Module, cfg: IBOTConfig | None = None, **ssl_kw):
        cfg = cfg if cfg is not None else IBOTConfig()
        if cfg.centering not in _CENTERINGS:
            raise ConfigError(f"objective.centering must be one of {_CENTERINGS}, got {cfg.centering!r}")
        if cfg.mask_shape not in _MASK_SHAPES:
            raise ConfigError(f"objective.mask_shape must be one of {_MASK_SHAPES}, got {cfg.mask_shape!r}")
        if not 0 <= cfg.mask_ratio[0] <= cfg.mask_ratio[1] < 1:
            raise ConfigError(f"objective.mask_ratio must be (lo, hi) with 0 <= lo <= hi < 1, got {cfg.mask_ratio}")
        if cfg.patch_center not in _PATCH_CENTERS:
            raise ConfigError(f"objective.patch_center must be one of {_PATCH_CENTERS}, got {cfg.patch_center!r}")
        check_patch_local_stem(model, "ibot", cfg.allow_mixing_stem)
        super().__init__(model, cfg, **ssl_kw)
        # The objective's own mask token: the exported backbone never needs one.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("center_patch", torch.zeros(1, cfg.out_dim))

    def teacher_patch_temp(self) -> float:
        return self.warmed(self.cfg.warmup_teacher_patch_temp, self.cfg.teacher_patch_temp)

    def _targets(self, logits: Tensor, center: Tensor, n_chunks: int) -> list[Tensor]:
        temp = self.teacher_temp()
        if self.cfg.centering == "sinkhorn_knopp":
            probs = sinkhorn_knopp(logits, temp, self.cfg.sinkhorn_iters)
        else:
            probs = sharpen(logits, center, temp)
            if self.training:
                update_center(center, logits, self.cfg.center_momentum)
        return list(probs.chunk(n_chunks)) if n_chunks > 1 else [probs]

    def patch_targets(self, t_patch: Tensor, mask: Tensor) -> Tensor:
        """(M, K) targets of the masked tokens from the teacher's patch logits.

        t_patch: (2B, L, K) logits of every patch token (``patch_center=all``), or (M, K) of the
        masked ones (``masked``). The centre moves after the targets are taken, as DINO's does.
        """
        temp = self.teacher_patch_temp()
        if self.cfg.patch_center == "masked":
            if self.cfg.centering == "sinkhorn_knopp":
                return sinkhorn_knopp(t_patch, temp, self.cfg.sinkhorn_iters)
            probs = sharpen(t_patch, self.center_patch, temp)
            if self.training:
                update_masked_center(self.center_patch, t_patch, self.cfg.center_momentum)
            return probs
        if self.cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(t_patch.flatten(0, 1), temp, self.cfg.sinkhorn_iters).view_as(t_patch)[mask]
        probs = sharpen(t_patch[mask], self.center_patch, temp)
        if self.training:
            # iBOT's update_center: each image's mean over its patch tokens, averaged over the global batch.
            update_center(self.center_patch, t_patch.mean(1), self.cfg.center_momentum)
        return probs

    def forward(self, batch: dict) -> dict[str, Tensor]:
        views = _views(batch, self)
        g = torch.cat(views[:2])  # (2B, C, H, W) the global crops
        n_img = g.shape[0]
        frozen = self.last_layer_frozen()

        # Student, global crops with masked patch tokens: (2B, prefix + L, D)
        tokens, ctx = self.model.embed(g)
        if self.cfg.mask_shape == "block" and ctx.num_patches == ctx.grid[0] * ctx.grid[1]:
            mask = block_token_mask(n_img, ctx.grid, self.cfg.mask_prob, self.cfg.mask_ratio, device=g.device)
        else:
            mask = random_token_mask(n_img, ctx.num_patches, self.cfg.mask_prob, self.cfg.mask_ratio, g.device)
        s_out = self.model.forward_tokens(tokens, ctx, token_mask=mask, mask_token=self.mask_token)
        s_cls = self.model.forward_head(s_out, pre_logits=True)  # (2B, D)
        s_patch = s_out[:, ctx.num_prefix_tokens:][mask]  # (M, D) the masked tokens
        s_logits = self.head(torch.cat([s_cls, s_patch]), frozen)
        s_global, s_patch_logits = s_logits[:n_img], s_logits[n_img:]
        student = list(s_global.chunk(2)) + self.student_logits(views[2:])

        with torch.no_grad():
            with batch_statistics(self.teacher, self.training):
                t_tokens, t_ctx = self.teacher.embed(g)
                t_out = self.teacher.forward_tokens(t_tokens, t_ctx)
            t_cls = self.teacher.forward_head(t_out, pre_logits=True)
            t_patch = t_out[:, t_ctx.num_prefix_tokens:]  # (2B, L, D) the same crops, unmasked
            all_tokens = self.cfg.patch_center == "all" and self.cfg.patch_loss_weight > 0
            t_patch = t_patch.flatten(0, 1) if all_tokens else t_patch[mask]  # (2B * L, D) or (M, D)
            t_logits = self.teacher_head(torch.cat([t_cls, t_patch])).float()
        targets = self._targets(t_logits[:n_img], self.center, 2)
        loss = dino_loss(student, targets, self.cfg.student_temp)
        out = {"dino_loss": loss.detach()}
        if self.cfg.patch_loss_weight > 0:
            per_image = mask.sum(1, keepdim=True).clamp_min(1).float().expand_as(mask)[mask]  # (M,)
            t_patch_logits = t_logits[n_img:]
            if all_tokens:
                t_patch_logits = t_patch_logits.view(n_img, mask.shape[1], -1)  # (2B, L, K)
            patch_targets = self.patch_targets(t_patch_logits, mask)
            patch = masked_patch_loss(s_patch_logits, patch_targets, 1.0 / per_image, n_img, self.cfg.student_temp)
            loss = loss + self.cfg.patch_loss_weight * patch
            out["patch_loss"] = patch.detach()
        if self.cfg.koleo_weight > 0:
            koleo = sum(koleo_loss(c) for c in s_cls.chunk(2))
            loss = loss + self.cfg.koleo_weight * koleo
            out["koleo"] = koleo.detach()
        out["loss"] = loss
        return out
