"""Top-k routed Mixture-of-Experts MLP with a load-balancing auxiliary loss."""

from __future__ import annotations

import torch
from torch import nn

from .mlp import Mlp


class MoEMlp(nn.Module):
    """E expert MLPs; each token goes to its k highest-scoring experts.

    Outputs are the experts' results weighted by the renormalised router probabilities
    of the chosen experts. After each forward, ``self.aux_loss`` holds the load-balancing
    loss ``E * sum_e f_e * P_e`` (f_e: fraction of routed slots taken by expert e,
    P_e: mean router probability of e), which equals 1 for a perfectly even split.
    The caller adds it to the task loss with its own weight (see ``model.aux_loss()``).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
        num_experts: int = 4,
        top_k: int = 2,
        expert_layer: type[nn.Module] = Mlp,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must be between 1 and num_experts {num_experts}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = nn.Linear(in_features, num_experts, bias=False)
        self.experts = nn.ModuleList(
            expert_layer(in_features, hidden_features, out_features, act_layer=act_layer, drop=drop, bias=bias)
            for _ in range(num_experts)
        )
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, C) tokens
        probs = self.router(x).float().softmax(dim=-1)  # (T, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (T, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)

        out = None
        for e, expert in enumerate(self.experts):
            token_idx, slot = (chosen == e).nonzero(as_tuple=True)
            y = expert(x[token_idx]) * weights[token_idx, slot, None]
            if out is None:
                out = x.new_zeros(x.shape[0], y.shape[-1])
            out = out.index_add(0, token_idx, y)

        routed = torch.zeros_like(probs).scatter_(1, chosen, 1.0)  # (T, E) one-hot of chosen experts
        fraction = routed.mean(dim=0) / self.top_k
        self.aux_loss = self.num_experts * (fraction * probs.mean(dim=0)).sum()
        return out.reshape(*shape[:-1], out.shape[-1])
