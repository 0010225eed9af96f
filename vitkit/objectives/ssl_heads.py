"""Heads that self-supervised objectives put on a backbone: DINO's projection head, MLP projectors.

They live with the objective, not the backbone: a run exports the backbone alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """A bias-free linear layer with weight normalisation: ``W = g * v / ||v||`` per output row.

    With ``fix_norm`` the gain ``g`` is frozen at 1 (DINO's ``norm_last_layer``), so the layer
    only chooses directions: a cosine similarity to ``out_dim`` prototypes.
    """

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)

    def forward(self, x: Tensor, frozen: bool = False) -> Tensor:
        v, g = self.weight_v, self.weight_g
        if frozen:
            # No gradient at all (DINO sets the last layer's grads to None): AdamW then skips the
            # layer, so its moments, step count and weight decay do not advance while frozen. Under
            # DDP this needs engine.find_unused_parameters=true (vitkit pretrain sets it).
            v, g = v.detach(), g.detach()
        return F.linear(x, g * F.normalize(v, dim=1))


class DINOHead(nn.Module):
    """MLP (``nlayers``, GELU) -> bottleneck -> L2-normalise -> weight-normed linear to ``out_dim``.

    Args:
        in_dim: backbone feature width.
        out_dim: prototypes K (65536 in DINO on ImageNet; a few thousand suit small data).
        hidden_dim, bottleneck_dim: MLP widths.
        norm_last_layer: freeze the last layer's gain at 1 (more stable; DINO's default for ViT-S).
    """

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(1, nlayers) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: Tensor, freeze_last_layer: bool = False) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return self.last_layer(x, frozen=freeze_last_layer)


def mlp(in_dim: int, hidden_dim: int, out_dim: int, nlayers: int = 2, last_bn: bool = False) -> nn.Sequential:
    """Linear-BatchNorm-ReLU x (nlayers - 1), then Linear (and an affine-free BatchNorm with ``last_bn``).

    The projector of SimCLR (2 layers) and MoCo v3 (3 layers, ``last_bn``), and MoCo v3's predictor.
    BatchNorm statistics are per process (no SyncBatchNorm), as in single-node SimCLR.
    """
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(max(1, nlayers) - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)
