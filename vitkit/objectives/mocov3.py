"""MoCo v3 (Chen, Xie and He, 2021): a momentum encoder, a predictor, symmetric InfoNCE, no queue.

The online network (backbone + 3-layer projector + 2-layer predictor) predicts, for each view,
the momentum encoder's projection of the other view; the negatives are the other images of the
global batch (gathered from every process). The momentum encoder (backbone + projector) follows
the online one with a momentum ramped from 0.99 to 1 on a cosine; its BatchNorms (a conv
stem's, the projector's) run in train mode during training steps, as in the reference code.
The patch projection of a ViT is random and frozen (``freeze_patch_embed``), the paper's
stability trick. The run exports the online backbone, as MoCo v3 does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.views import MultiCrop, ViewAugment, dino_styles
from ..engine.distributed import all_gather_with_grad, get_rank
from ..engine.ema import ema_update
from ..engine.protocol import StepContext
from .dino import _views
from .registry import register_objective
from .ssl import (
    SelfSupervised,
    backbone_features,
    batch_statistics,
    context_kwargs,
    cosine_ramp,
    freeze_patch_projection,
    frozen_copy,
)
from .ssl_heads import mlp


@dataclass
class MoCoV3Config:
    """``objective.*`` keys of ``mocov3``."""

    temperature: float = 0.2
    momentum: float = 0.99
    proj_hidden_dim: int = 2048
    proj_dim: int = 256
    pred_hidden_dim: int = 2048
    crop_scale: tuple[float, float] = (0.08, 1.0)
    # The paper's stability trick for ViT (its code's stop_grad_conv1): the patch projection keeps
    # its random initialisation. Applied when the backbone's first layer is a patch projection
    # (patch_embed.proj with kernel = stride on the pixels); a no-op with a conv stem, a hybrid
    # ResNet or an overlapping embedding, which have no such layer.
    freeze_patch_embed: bool = True
    knn_k: int = 20
    knn: bool = True  # k-NN of the features at each evaluation (needs labels)


def info_nce(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """InfoNCE of queries (B, D) against the global batch of keys (no gradient through keys).

    Query i's positive is key i of this process; every other key of every process is a negative.
    Scaled by ``2 * temperature`` as in MoCo v3.
    """
    q = F.normalize(q.float(), dim=-1)
    k = all_gather_with_grad(F.normalize(k.detach().float(), dim=-1))  # (N, D)
    logits = q @ k.T / temperature  # (B, N)
    labels = torch.arange(q.shape[0], device=q.device) + get_rank() * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


@register_objective("mocov3", MoCoV3Config)
class MoCoV3(SelfSupervised):
    """Online backbone + projector + predictor against a momentum backbone + projector."""

    def __init__(self, model: nn.Module, cfg: MoCoV3Config | None = None, **ssl_kw):
        cfg = cfg if cfg is not None else MoCoV3Config()
        super().__init__(model, knn_k=cfg.knn_k, **ssl_kw)
        self.cfg = cfg
        # Whether the patch projection was frozen (False: the option is off or the model has none).
        self.patch_embed_frozen = cfg.freeze_patch_embed and freeze_patch_projection(self.model)
        self.projector = mlp(self.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, nlayers=3, last_bn=True)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, nlayers=2, last_bn=True)
        self.momentum_encoder = frozen_copy(self.model)
        self.momentum_projector = frozen_copy(self.projector)

    @classmethod
    def from_config(cls, model: nn.Module, cfg: MoCoV3Config, **context):
        return cls(model, cfg, **context_kwargs(context, cfg.knn))

    @classmethod
    def train_pipeline(cls, cfg: MoCoV3Config, model: nn.Module, img_size: int, in_chans: int, mean, std):
        crops = MultiCrop(img_size, n_global=2, in_chans=in_chans, global_scale=cfg.crop_scale)
        return crops, ViewAugment(dino_styles(0), mean, std)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"momentum_encoder": self.momentum_encoder, "momentum_projector": self.momentum_projector}

    def on_step_end(self, ctx: StepContext) -> None:
        m = cosine_ramp(self.cfg.momentum, 1.0, float(self.progress))
        ema_update(self.momentum_encoder, self.model, m)
        ema_update(self.momentum_projector, self.projector, m)
        super().on_step_end(ctx)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        v1, v2 = _views(batch, self)[:2]
        x = torch.cat([v1, v2])
        q1, q2 = self.predictor(self.projector(backbone_features(self.model, x))).chunk(2)
        with torch.no_grad(), batch_statistics(self.momentum_projector) as proj:
            with batch_statistics(self.momentum_encoder, self.training):
                feats = backbone_features(self.momentum_encoder, x)
            k1, k2 = proj(feats).chunk(2)
        T = self.cfg.temperature
        return {"loss": info_nce(q1, k2, T) + info_nce(q2, k1, T)}
