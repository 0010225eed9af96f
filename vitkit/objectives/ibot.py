"""iBOT (Zhou et al., 2022) and DINOv2 (Oquab et al., 2023) pieces on top of DINO.

- **Masked patch prediction** (iBOT): some of the student's global crops have a random share of
  their patch tokens replaced by a mask token (``forward_tokens(token_mask=...)``), in
  rectangular blocks by default (``mask_shape=block``, as iBOT) or patch by patch; at those
  places the student's patch outputs are trained to match the teacher's outputs for the
  unmasked crop (centred and sharpened with their own centre).
- **KoLeo** (DINOv2): ``-mean(log(distance to the nearest neighbour))`` of the student's
  normalised features in a batch, which spreads them out.
- **Sinkhorn-Knopp centring** (SwAV/DINOv2): teacher targets from a few Sinkhorn iterations
  that balance the prototypes over the global batch, instead of the running centre.

Registers and LayerScale come from the backbone (``vit_*_reg*``, ``init_values``). The run
exports the teacher backbone.
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

_CENTERINGS = ("center", "sinkhorn_knopp")
_MASK_SHAPES = ("block", "random")


@dataclass
class IBOTConfig(DINOConfig):
    """``objective.*`` keys of ``ibot``: DINO's, plus masking, the patch loss, KoLeo and the centring."""

    mask_prob: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_shape: str = "block"  # block (rectangles of patches) | random (patch by patch)
    patch_loss_weight: float = 1.0
    koleo_weight: float = 0.0
    centering: str = "center"  # center | sinkhorn_knopp
    sinkhorn_iters: int = 3


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
    the rows are returned summing to 1.
    """
    logits = logits.float()
    top = logits.max().clone()
    if is_dist():  # one shift for every process keeps the normalisations global
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    q = torch.exp((logits - top) / temp).T  # (K, N)
    k = q.shape[0]
    n = all_reduce_sum(torch.tensor(float(q.shape[1]), device=q.device))
    q /= all_reduce_sum(q.sum())
    for _ in range(n_iters):
        q /= all_reduce_sum(q.sum(1, keepdim=True))  # every prototype gets 1/K of the mass
        q /= k
        q /= q.sum(0, keepdim=True)  # every row 1/N
        q /= n
    return (q * n).T


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
        super().__init__(model, cfg, **ssl_kw)
        # The objective's own mask token: the exported backbone never needs one.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("center_patch", torch.zeros(1, cfg.out_dim))

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def _targets(self, logits: Tensor, center: Tensor, n_chunks: int) -> list[Tensor]:
        temp = self.teacher_temp()
        if self.cfg.centering == "sinkhorn_knopp":
            probs = sinkhorn_knopp(logits, temp, self.cfg.sinkhorn_iters)
        else:
            probs = sharpen(logits, center, temp)
            if self.training:
                update_center(center, logits, self.cfg.center_momentum)
        return list(probs.chunk(n_chunks)) if n_chunks > 1 else [probs]

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
            t_tokens, t_ctx = self.teacher.embed(g)
            t_out = self.teacher.forward_tokens(t_tokens, t_ctx)
            t_cls = self.teacher.forward_head(t_out, pre_logits=True)
            t_patch = t_out[:, t_ctx.num_prefix_tokens:][mask]  # (M, D) the same places, unmasked
            t_logits = self.teacher_head(torch.cat([t_cls, t_patch])).float()
        targets = self._targets(t_logits[:n_img], self.center, 2)
        loss = dino_loss(student, targets, self.cfg.student_temp)
        out = {"dino_loss": loss.detach()}
        if self.cfg.patch_loss_weight > 0:
            per_image = mask.sum(1, keepdim=True).clamp_min(1).float().expand_as(mask)[mask]  # (M,)
            patch_targets = self._targets(t_logits[n_img:], self.center_patch, 1)[0]
            patch = masked_patch_loss(s_patch_logits, patch_targets, 1.0 / per_image, n_img, self.cfg.student_temp)
            loss = loss + self.cfg.patch_loss_weight * patch
            out["patch_loss"] = patch.detach()
        if self.cfg.koleo_weight > 0:
            koleo = sum(koleo_loss(c) for c in s_cls.chunk(2))
            loss = loss + self.cfg.koleo_weight * koleo
            out["koleo"] = koleo.detach()
        out["loss"] = loss
        return out
