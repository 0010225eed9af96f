"""Segmenter's mask transformer (Strudel et al., 2021): class embeddings decoded jointly with the
patch tokens, masks as scalar products of L2-normalised patch and class features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...layers import Block
from ..registry import register_head


@register_head("segmenter", tasks=("segment",))
class MaskTransformerHead(nn.Module):
    """Segmenter's ``MaskTransformer`` on the backbone's last normalised feature map.

    The patch tokens are projected to ``d_model`` (``proj_dec``), ``out_chans`` learnable class
    embeddings (``cls_emb``) are appended, ``n_layers`` pre-norm transformer blocks run on the
    joint sequence, and after ``decoder_norm`` the patch and class features are projected
    (``proj_patch``, ``proj_classes``), L2-normalised and multiplied: masks (B, N, classes),
    LayerNorm'd over the classes (``mask_norm``) and laid out on the patch grid.

    Defaults as Segmenter's: 2 layers, ``d_model`` the backbone width, ``d_model // 64`` heads,
    MLP ratio 4, dropout 0.1, drop path 0.0. Parameter names follow Segmenter's checkpoints.
    """

    def __init__(self, backbone: nn.Module, out_chans: int, n_layers: int = 2, d_model: int | None = None,
                 n_heads: int | None = None, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, dropout: float = 0.1):
        super().__init__()
        d_encoder = backbone.feature_info[-1]["num_chs"]
        d_model = d_encoder if d_model is None else d_model
        n_heads = max(1, d_model // 64) if n_heads is None else n_heads
        if n_layers < 1 or n_heads < 1 or d_model % n_heads:
            raise ConfigError(
                f"segmenter head: n_layers {n_layers} and n_heads {n_heads} must be >= 1 and d_model {d_model} "
                "divisible by n_heads"
            )
        self.n_cls = out_chans
        scale = d_model ** -0.5
        dpr = torch.linspace(0, drop_path_rate, n_layers).tolist()
        self.blocks = nn.ModuleList([
            Block(d_model, n_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout, drop_path=dpr[i],
                  norm_layer=nn.LayerNorm)
            for i in range(n_layers)
        ])
        self.cls_emb = nn.Parameter(torch.randn(1, out_chans, d_model))
        self.proj_dec = nn.Linear(d_encoder, d_model)
        self.proj_patch = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(out_chans)
        # Segmenter's init_weights on every Linear / LayerNorm, then the class embeddings.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"cls_emb"}

    def forward(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        feat = backbone.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]  # (B, C, h, w)
        B, _, h, w = feat.shape
        tokens = self.proj_dec(feat.flatten(2).transpose(1, 2))
        tokens = torch.cat([tokens, self.cls_emb.expand(B, -1, -1)], dim=1)  # patches first, classes last
        for blk in self.blocks:
            tokens = blk(tokens)
        tokens = self.decoder_norm(tokens)
        patches, classes = tokens[:, :-self.n_cls], tokens[:, -self.n_cls:]
        patches = F.normalize(patches @ self.proj_patch, dim=-1)
        classes = F.normalize(classes @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, h*w, classes)
        return masks.transpose(1, 2).reshape(B, self.n_cls, h, w)
