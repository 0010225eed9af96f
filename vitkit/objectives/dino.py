"""DINO (Caron et al., 2021): self-distillation with no labels.

A student (the backbone + a :class:`~vitkit.objectives.ssl_heads.DINOHead`) learns to match an
EMA teacher (the same network, momentum ramped to 1 on a cosine) across crops of one image: the
2 global crops go through both networks, the N local crops through the student only. The
teacher's outputs are centred (a running mean, momentum 0.9) and sharpened (temperature 0.04,
the reference code's default); the loss is the cross-entropy of the paper's pseudocode, over every pair
of (teacher global crop, student crop of another view). The head's last layer is frozen for the
first epoch and the weight decay follows a cosine. The run exports the teacher backbone.

As in the reference code, the teacher's BatchNorms (a conv stem's) run in train mode during
training steps (batch statistics; their running statistics follow the teacher's own forward
passes), every parameter with more than one dimension is weight-decayed, and the frozen last
layer gets no gradient at all, so AdamW neither moves nor decays it nor counts its steps.
``vitkit pretrain`` clips each parameter's gradient norm separately (``optim.clip_mode=per_param``)
as DINO's ``clip_gradients`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.views import MultiCrop, ViewAugment, dino_styles
from ..engine.distributed import all_reduce_sum, get_world_size
from ..engine.ema import ema_update
from ..engine.protocol import StepContext
from ..errors import ConfigError
from .registry import register_objective
from .ssl import SelfSupervised, backbone_features, batch_statistics, context_kwargs, cosine_ramp, frozen_copy
from .ssl_heads import DINOHead


@dataclass
class DINOConfig:
    """``objective.*`` keys of ``dino`` (and of ``ibot``, which adds its own)."""

    out_dim: int = 4096
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = True
    freeze_last_layer_epochs: float = 1.0
    # The freeze ends at this share of the run at the latest. DINO freezes the first of its 100-800
    # epochs (at most 1% of the run), so 0.05 never binds at the paper's lengths; in a 6-epoch run
    # one epoch would hold the prototypes still for 17% of it. 1.0: the epochs alone decide.
    freeze_last_layer_max: float = 0.05
    momentum_teacher: float = 0.996
    center_momentum: float = 0.9
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    # 0.04 throughout is DINO's code default ("start with 0.04 ... anything above 0.07 is unstable");
    # its long ViT-S/16 runs warm up to 0.07 over their first 30 epochs: teacher_temp=0.07 with
    # teacher_temp_warmup=0.3. On CIFAR-10 in 30 CPU minutes (4 epochs) the warm-up to 0.07 left the
    # teacher near uniform (entropy 8.2 of ln 4096 = 8.3; k-NN 34.7%) where 0.04 kept it learning
    # (entropy 7.2; k-NN 36.3%): benchmarks/results/ssl_cifar10.json.
    teacher_temp: float = 0.04
    teacher_temp_warmup: float = 0.3  # fraction of the run over which the teacher temperature moves
    local_crops: int = 6
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    weight_decay_end: float | None = 0.4
    knn_k: int = 20
    knn: bool = True  # k-NN of the features at each evaluation (needs labels)

    def __post_init__(self):
        if not 0 < self.freeze_last_layer_max <= 1:
            raise ConfigError(f"objective.freeze_last_layer_max is a share of the run in (0, 1] (1: no cap), "
                              f"got {self.freeze_last_layer_max!r}")


def dino_loss(student_logits: list[Tensor], teacher_probs: list[Tensor], student_temp: float) -> Tensor:
    """The DINO pseudocode's loss: mean over pairs (teacher view i, student view v != i) of
    ``sum(-p_t * log_softmax(s / student_temp))`` averaged over the batch.

    student_logits: one (B, K) tensor per crop, the global crops first, in the teacher's order.
    teacher_probs: one (B, K) tensor per global crop, already centred and sharpened.
    """
    log_p = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    total, pairs = 0.0, 0
    for i, q in enumerate(teacher_probs):
        for v, lp in enumerate(log_p):
            if v == i:
                continue  # a crop never predicts itself
            total = total + torch.sum(-q * lp, dim=-1).mean()
            pairs += 1
    return total / pairs


def sharpen(teacher_logits: Tensor, center: Tensor, temp: float) -> Tensor:
    """``softmax((t - center) / temp)``: the centred, sharpened teacher target."""
    return F.softmax((teacher_logits.float() - center) / temp, dim=-1)


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float) -> None:
    """EMA of the teacher's mean output over the global batch (every process): ``center = m * center + (1 - m) * mean``."""
    total = all_reduce_sum(teacher_logits.float().sum(0, keepdim=True))  # (1, K)
    batch_center = total / (teacher_logits.shape[0] * get_world_size())
    center.mul_(momentum).add_(batch_center, alpha=1 - momentum)


def local_size_for(model: nn.Module, img_size: int, in_chans: int) -> int:
    """Local crop side: ~3/7 of the global side (96 of 224), a whole number (>= 2) of patches."""
    with torch.no_grad():
        _, ctx = model.embed(torch.zeros(1, in_chans, img_size, img_size, device=next(model.parameters()).device))
    patch = img_size // ctx.grid[0]
    return patch * max(2, round(img_size * 3 / 7 / patch))


@register_objective("dino", DINOConfig)
class DINO(SelfSupervised):
    """Student backbone + head against an EMA teacher; see the module notes.

    ``batch["views"]``: 2 global crops (B, C, H, W), then any number of local crops (B, C, h, w).
    """

    def __init__(self, model: nn.Module, cfg: DINOConfig | None = None, **ssl_kw):
        cfg = cfg if cfg is not None else DINOConfig()
        super().__init__(model, knn_k=cfg.knn_k, weight_decay_end=cfg.weight_decay_end, **ssl_kw)
        self.cfg = cfg
        self.head = DINOHead(self.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers,
                             cfg.norm_last_layer)
        self.teacher = frozen_copy(self.model)
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        # Optimizer steps of the frozen-last-layer phase; known after the first step (-1: not yet).
        self.register_buffer("freeze_steps", torch.tensor(-1, dtype=torch.long))

    @classmethod
    def from_config(cls, model: nn.Module, cfg: DINOConfig, **context):
        return cls(model, cfg, **context_kwargs(context, cfg.knn))

    @classmethod
    def train_pipeline(cls, cfg: DINOConfig, model: nn.Module, img_size: int, in_chans: int, mean, std):
        crops = MultiCrop(img_size, local_size_for(model, img_size, in_chans), 2, cfg.local_crops, in_chans,
                          cfg.global_scale, cfg.local_scale)
        return crops, ViewAugment(dino_styles(cfg.local_crops), mean, std)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "teacher_head": self.teacher_head}

    def no_weight_decay(self) -> set[str]:
        """Nothing by name: DINO's and iBOT's ``get_params_groups`` decay every parameter with more
        than one dimension (the class token, position embedding and the last layer's ``weight_v``
        included) and leave only biases and norms (ndim 1) undecayed, which the optimizer's
        grouping already does."""
        return set()

    def export_model(self) -> nn.Module:
        return self.teacher

    # ------------------------------------------------------------------ schedules

    def warmed(self, start: float, end: float) -> float:
        """Linear from ``start`` to ``end`` over the first ``teacher_temp_warmup`` of the run, then ``end``."""
        w = self.cfg.teacher_temp_warmup
        frac = min(1.0, float(self.progress) / w) if w > 0 else 1.0
        return start + (end - start) * frac

    def teacher_temp(self) -> float:
        return self.warmed(self.cfg.warmup_teacher_temp, self.cfg.teacher_temp)

    def last_layer_frozen(self) -> bool:
        if self.cfg.freeze_last_layer_epochs <= 0 or float(self.progress) >= self.cfg.freeze_last_layer_max:
            return False
        return int(self.freeze_steps) < 0 or int(self.step) < int(self.freeze_steps)

    def on_step_end(self, ctx: StepContext) -> None:
        momentum = cosine_ramp(self.cfg.momentum_teacher, 1.0, float(self.progress))
        ema_update(self.teacher, self.model, momentum)
        ema_update(self.teacher_head, self.head, momentum)
        spe = getattr(ctx.trainer, "steps_per_epoch", None)
        if spe:
            self.freeze_steps.fill_(round(self.cfg.freeze_last_layer_epochs * spe))
        super().on_step_end(ctx)

    # ------------------------------------------------------------------ forward

    def student_logits(self, views: list[Tensor]) -> list[Tensor]:
        """One (B, K) student output per view; views of one size share a forward pass."""
        frozen = self.last_layer_frozen()
        out: list[Tensor | None] = [None] * len(views)
        for idx in _same_size_groups(views):
            b = views[idx[0]].shape[0]
            logits = self.head(backbone_features(self.model, torch.cat([views[i] for i in idx])), frozen)
            for j, i in enumerate(idx):
                out[i] = logits[j * b : (j + 1) * b]
        return out

    @torch.no_grad()
    def teacher_logits(self, global_views: list[Tensor]) -> Tensor:
        """(n_global * B, K) teacher outputs of the global crops."""
        with batch_statistics(self.teacher, self.training):
            feats = backbone_features(self.teacher, torch.cat(global_views))
        return self.teacher_head(feats).float()

    def teacher_targets(self, t_logits: Tensor, n: int) -> list[Tensor]:
        """Centred, sharpened targets (one (B, K) per global crop); updates the centre afterwards."""
        probs = sharpen(t_logits, self.center, self.teacher_temp())
        if self.training:
            update_center(self.center, t_logits, self.cfg.center_momentum)
        return list(probs.chunk(n))

    def forward(self, batch: dict) -> dict[str, Tensor]:
        views = _views(batch, self)
        t_logits = self.teacher_logits(views[:2])
        targets = self.teacher_targets(t_logits, 2)
        loss = dino_loss(self.student_logits(views), targets, self.cfg.student_temp)
        entropy = -(targets[0] * targets[0].clamp_min(1e-12).log()).sum(-1).mean()
        return {"loss": loss, "teacher_entropy": entropy.detach()}


def _views(batch: dict, objective: nn.Module) -> list[Tensor]:
    views = batch.get("views")
    if not views or len(views) < 2:
        raise ConfigError(
            f"{type(objective).__name__} needs batch['views'] with at least 2 crops per image (got "
            f"{0 if not views else len(views)}): train it through vitkit pretrain, whose loader makes them"
        )
    return list(views)


def _same_size_groups(views: list[Tensor]) -> list[list[int]]:
    """Indices of the views grouped by spatial size, in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, v in enumerate(views):
        groups.setdefault(tuple(v.shape[2:]), []).append(i)
    return list(groups.values())
