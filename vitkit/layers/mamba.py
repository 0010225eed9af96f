"""Bidirectional Mamba mixer (Vision Mamba's token mixer), pure PyTorch.

One input projection feeds two selective scans, one over the sequence and one over its
reverse, each with its own causal depthwise conv, step/B/C projections, A and D; their
outputs are averaged and projected back. Parameter names follow the Vision Mamba checkpoints
(``in_proj``, ``conv1d``/``conv1d_b``, ``x_proj``/``x_proj_b``, ``dt_proj``/``dt_proj_b``,
``A_log``/``A_b_log``, ``D``/``D_b``, ``out_proj``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ssm import selective_scan, selective_scan_ref


class BiMamba(nn.Module):
    """(B, L, dim) -> (B, L, dim) token mixer with a forward and a backward selective scan.

    d_state: N, the size of each channel's hidden state. expand: inner width / dim.
    dt_rank: rank of the step projection ("auto": ceil(dim / 16)).
    dt_min / dt_max: range the initial step sizes are drawn from (log-uniform).
    reference: use the position-by-position scan (slow; for checking).
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        chunk_size: int = 64,
        reference: bool = False,
    ):
        super().__init__()
        self.d_inner = expand * dim
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.chunk_size = chunk_size
        self.reference = reference
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)
        for suffix in ("", "_b"):
            conv = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
            setattr(self, "conv1d" + suffix, conv)
            setattr(self, "x_proj" + suffix, nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            dt_proj = nn.Linear(self.dt_rank, self.d_inner)
            _init_dt_proj(dt_proj, self.dt_rank, dt_min, dt_max, dt_init_floor)
            setattr(self, "dt_proj" + suffix, dt_proj)
            # S4D-real init: state n decays at rate n, so the states cover a range of time scales.
            A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)  # (d_inner, N)
            setattr(self, "A_log" if not suffix else "A_b_log", nn.Parameter(A.log()))
            setattr(self, "D" + suffix, nn.Parameter(torch.ones(self.d_inner)))
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def _scan(self, x: torch.Tensor, z: torch.Tensor, suffix: str) -> torch.Tensor:
        """One direction: causal conv, selective scan, gate. x, z: (B, L, d_inner)."""
        L = x.shape[1]
        conv = getattr(self, "conv1d" + suffix)
        # Padding d_conv-1 on both sides and keeping the first L outputs makes the conv causal.
        x = F.silu(conv(x.transpose(1, 2))[..., :L].transpose(1, 2))  # (B, L, d_inner)
        dt, B, C = getattr(self, "x_proj" + suffix)(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(getattr(self, "dt_proj" + suffix)(dt))  # (B, L, d_inner)
        A = -getattr(self, "A_log" if not suffix else "A_b_log").exp()  # (d_inner, N), negative: states decay
        D = getattr(self, "D" + suffix)
        if self.reference:
            y = selective_scan_ref(x, delta, A, B, C, D)
        else:
            y = selective_scan(x, delta, A, B, C, D, chunk_size=self.chunk_size)
        return y * F.silu(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, d_inner) each
        y = self._scan(x, z, "")
        y_b = self._scan(x.flip(1), z.flip(1), "_b").flip(1)
        return self.out_proj((y + y_b) / 2)


def _init_dt_proj(proj: nn.Linear, rank: int, dt_min: float, dt_max: float, floor: float) -> None:
    """Small random weights and a bias whose softplus is a step drawn log-uniformly in [dt_min, dt_max]."""
    std = rank ** -0.5
    nn.init.uniform_(proj.weight, -std, std)
    dt = torch.exp(torch.rand(proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=floor)
    with torch.no_grad():
        proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
