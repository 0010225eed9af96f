"""SimCLR (Chen et al., 2020): two augmented views of each image, NT-Xent over the global batch.

Each view goes through the backbone and a 2-layer projection MLP; the normalised projections of
the two views of one image are positives, every other view in the global batch (every process,
gathered with gradients) is a negative. The run exports the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.views import MultiCrop, ViewAugment, simclr_styles
from ..engine.distributed import all_gather_with_grad, get_rank
from .dino import _views
from .registry import register_objective
from .ssl import SelfSupervised, backbone_features, context_kwargs
from .ssl_heads import mlp


@dataclass
class SimCLRConfig:
    """``objective.*`` keys of ``simclr``."""

    temperature: float = 0.2
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    crop_scale: tuple[float, float] = (0.08, 1.0)
    blur_prob: float = 0.5
    knn_k: int = 20
    knn: bool = True  # k-NN of the features at each evaluation (needs labels)


def nt_xent(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """NT-Xent of this process's rows against the global batch.

    a, b: (B, D) projections of view 1 and view 2 (same image at the same row). The 2N global
    embeddings (N = B x processes, gathered with gradients) form the candidates; each local row's
    positive is the other view of its image, itself is excluded. The mean over this process's 2B
    rows, averaged over processes (what DDP's gradient averaging does), is the loss over the whole
    global batch.
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    B = a.shape[0]
    a_all, b_all = all_gather_with_grad(a), all_gather_with_grad(b)  # (N, D) each
    N = a_all.shape[0]
    logits = torch.cat([a, b]) @ torch.cat([a_all, b_all]).T / temperature  # (2B, 2N)
    rows = torch.arange(B, device=a.device) + get_rank() * B  # this process's images in the global batch
    self_cols = torch.cat([rows, rows + N])
    pos_cols = torch.cat([rows + N, rows])
    logits = logits.masked_fill(F.one_hot(self_cols, 2 * N).bool(), float("-inf"))
    return F.cross_entropy(logits, pos_cols)


@register_objective("simclr", SimCLRConfig)
class SimCLR(SelfSupervised):
    """Backbone + projector, NT-Xent between the two views of ``batch["views"]``."""

    def __init__(self, model: nn.Module, cfg: SimCLRConfig | None = None, **ssl_kw):
        cfg = cfg if cfg is not None else SimCLRConfig()
        super().__init__(model, knn_k=cfg.knn_k, **ssl_kw)
        self.cfg = cfg
        self.projector = mlp(self.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, nlayers=2)

    @classmethod
    def from_config(cls, model: nn.Module, cfg: SimCLRConfig, **context):
        return cls(model, cfg, **context_kwargs(context, cfg.knn))

    @classmethod
    def train_pipeline(cls, cfg: SimCLRConfig, model: nn.Module, img_size: int, in_chans: int, mean, std):
        crops = MultiCrop(img_size, n_global=2, in_chans=in_chans, global_scale=cfg.crop_scale)
        return crops, ViewAugment(simclr_styles(2, cfg.blur_prob), mean, std)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        v1, v2 = _views(batch, self)[:2]
        z = self.projector(backbone_features(self.model, torch.cat([v1, v2])))  # (2B, proj_dim)
        a, b = z.chunk(2)
        return {"loss": nt_xent(a, b, self.cfg.temperature)}
