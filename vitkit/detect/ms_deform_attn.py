"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) in pure PyTorch.

Each query attends to a few sampled points per head and feature level around its reference
point, instead of to every key: offsets and weights are predicted from the query, values are
read by bilinear sampling (``F.grid_sample``). This is the reference implementation's
``ms_deform_attn_core_pytorch``; no compiled kernel is needed, on CPU or GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError


def ms_deform_attn_core(value: Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: Tensor,
                        attention_weights: Tensor) -> Tensor:
    """Sample and weight the values of every level at the given locations.

    ``value`` (B, S, heads, head_dim) holds the levels' maps flattened row-major and concatenated
    (``spatial_shapes`` lists each level's (h, w), summing to S); ``sampling_locations``
    (B, Q, heads, levels, points, 2) are (x, y) in [0, 1] of each level's map (0 and 1 are its
    outer edges, so pixel centres sit at (i + 0.5) / w); outside the map reads zeros.
    ``attention_weights`` (B, Q, heads, levels, points). Returns (B, Q, heads * head_dim).
    """
    B, _, heads, head_dim = value.shape
    _, Q, _, levels, points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] with align_corners=False
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(B * heads, head_dim, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*heads, Q, points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(B * heads, 1, Q, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (B*heads, head_dim, Q)
    return out.view(B, heads * head_dim, Q).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: ``n_points`` samples per head and level around each query's
    reference point. Parameter names (``sampling_offsets``, ``attention_weights``, ``value_proj``,
    ``output_proj``) and initialisation are the reference implementation's."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"d_model ({d_model}) must be divisible by the number of heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start at zero weight with a bias fanning each head out in its own direction, the
        # k-th point k steps away: sampling starts as a spread of fixed points around the reference.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid *= torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: list[tuple[int, int]],
                padding_mask: Tensor | None = None) -> Tensor:
        """``query`` (B, Q, d) (position already added); ``reference_points`` (B, Q, levels, 2) as
        (x, y) in [0, 1] per level, or (B, Q, levels, 4) boxes (cx, cy, w, h), whose size then
        scales the offsets; ``value`` (B, S, d) the flattened levels; ``padding_mask`` (B, S) True
        on padded positions, which are zeroed. Returns (B, Q, d)."""
        B, Q, _ = query.shape
        S = value.shape[1]
        if sum(h * w for h, w in spatial_shapes) != S:
            raise ValueError(f"the spatial shapes {spatial_shapes} do not add up to the {S} values given")
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(B, S, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(B, Q, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(B, Q, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(B, Q, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: (w, h) turns them into fractions of the map.
            normalizer = torch.tensor([(w, h) for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference points end in 2 (x, y) or 4 (box) values, got {reference_points.shape[-1]}")
        return self.output_proj(ms_deform_attn_core(value, spatial_shapes, locations, weights))
