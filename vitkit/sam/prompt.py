"""SAM's prompt encoder: points, box corners and a dense mask turned into the tokens and the
dense embedding the mask decoder reads (Kirillov et al., 2023).

Parameter names follow the reference (``pe_layer.positional_encoding_gaussian_matrix``,
``point_embeddings.{0..3}``, ``not_a_point_embed``, ``mask_downscaling.*``, ``no_mask_embed``) so
its checkpoints load by name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier position encoding (Tancik et al., 2020): a fixed Gaussian (2, F) projection
    of coordinates in [-1, 1], then sin and cos -> 2F channels."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None):
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        # A buffer, not a parameter: the frequencies stay fixed during training, as in the reference.
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """coords (..., 2) in [0, 1] as (x, y) -> (..., 2F)."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """The encoding of every cell centre of an (h, w) grid -> (2F, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Pixel coordinates (B, N, 2) as (x, y) in an image of ``image_size`` (h, w) -> (B, N, 2F)."""
        scale = coords.new_tensor([1.0 / image_size[1], 1.0 / image_size[0]])
        return self._pe_encoding((coords * scale).float())


class PromptEncoder(nn.Module):
    """Sparse prompts (points, boxes) -> tokens (B, N, embed_dim); a mask prompt -> a dense
    embedding (B, embed_dim, h, w) (the learned ``no_mask_embed`` everywhere when there is none).

    Args:
        embed_dim: the prompt and decoder width.
        image_embedding_size: (h, w) of the image encoder's output.
        input_image_size: (H, W) of the padded image the encoder reads (points are in its pixels).
        mask_in_chans: hidden channels of the mask downscaling convolutions.
    """

    num_point_embeddings = 4  # negative point, positive point, box top-left, box bottom-right

    def __init__(self, embed_dim: int, image_embedding_size: tuple[int, int], input_image_size: tuple[int, int],
                 mask_in_chans: int = 16):
        super().__init__()
        if embed_dim % 2:
            raise ValueError(f"the prompt embedding width must be even (sin and cos halves), got {embed_dim}")
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.mask_in_chans = mask_in_chans
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4, eps=1e-6),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans, eps=1e-6),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """The position encoding of the image embedding's grid, (1, embed_dim, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # pixel centres
        if pad:
            # Without a box the decoder still sees a second sparse slot: a not-a-point, as the
            # reference pads (the model was trained so).
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        lab = labels[..., None]
        emb = torch.where(lab == -1, self.not_a_point_embed.weight.to(emb.dtype), emb)
        emb = emb + (lab == 0).to(emb.dtype) * self.point_embeddings[0].weight
        emb = emb + (lab == 1).to(emb.dtype) * self.point_embeddings[1].weight
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = self.pe_layer.forward_with_coords((boxes + 0.5).reshape(-1, 2, 2), self.input_image_size)
        corner_emb = torch.stack([self.point_embeddings[2].weight[0], self.point_embeddings[3].weight[0]])
        return corners + corner_emb.to(corners.dtype)

    def forward(self, points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None,
                masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """points: (coords (B, N, 2) in input pixels, labels (B, N): 1 fg, 0 bg, -1 padding);
        boxes: (B, 4) xyxy; masks: (B, 1, 4h, 4w) logits -> (sparse (B, N', C), dense (B, C, h, w))."""
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        device = self.no_mask_embed.weight.device
        sparse = [torch.empty(bs, 0, self.embed_dim, device=device)]
        if points is not None:
            sparse.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        sparse_embeddings = torch.cat(sparse, dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse_embeddings, dense


__all__ = ["PositionEmbeddingRandom", "PromptEncoder"]
