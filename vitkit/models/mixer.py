"""MLP-Mixer: An all-MLP Architecture for Vision (Tolstikhin et al., 2021).

No attention: each block mixes information across patches with an MLP applied to every
channel's row of tokens (token mixing), then within each patch with an MLP over channels
(channel mixing). The token-mixing MLP has one weight per patch position, so a Mixer runs
only at the token count it was built for: build it with ``img_size=...`` for another size.
Parameter names follow the common checkpoint layout (``stem.proj``, ``blocks.N.mlp_tokens.fc1``,
``blocks.N.mlp_channels.fc1``, ``norm``, ``head``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import DropPath, Mlp, PatchEmbed
from ._base import Backbone, Point, check_image
from ._registry import INCEPTION_MEAN, INCEPTION_STD, register_family


class MixerBlock(nn.Module):
    """x + token_mlp(norm1(x)^T)^T, then x + channel_mlp(norm2(x)), on (B, N, C) tokens."""

    def __init__(
        self, dim: int, seq_len: int, mlp_ratio: tuple[float, float] = (0.5, 4.0), drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        tokens_dim, channels_dim = int(mlp_ratio[0] * dim), int(mlp_ratio[1] * dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = Mlp(seq_len, tokens_dim, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, channels_dim, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))  # mix over N
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class MlpMixer(Backbone):
    """MLP-Mixer backbone; ``forward_features`` returns (B, N, D) normalised patch tokens."""

    # The token-mixing weights are sized by the patch count: other input sizes need a rebuilt model.
    fixed_input_size = True
    pools = ("avg", "")
    classifier_init_std = None

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 512,
        num_blocks: int = 8,
        mlp_ratio: tuple[float, float] = (0.5, 4.0),
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = self.embed_dim = embed_dim

        self.stem = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        dpr = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]  # grows with depth
        self.blocks = nn.Sequential(*[
            MixerBlock(embed_dim, self.stem.num_patches, tuple(mlp_ratio), proj_drop_rate, dpr[i])
            for i in range(num_blocks)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_classifier(num_classes, drop_rate)
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=self.stem.patch_size[0], module=f"blocks.{i}") for i in range(num_blocks)
        ]
        self._init_weights()

    def _init_weights(self) -> None:
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name == "head":
                    nn.init.trunc_normal_(m.weight, std=0.02)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if "mlp" in name:
                    nn.init.normal_(m.bias, std=1e-6)  # tiny random MLP biases, as in the reference init
                else:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ backbone API
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem", "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    # ------------------------------------------------------------------ forward
    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        check_image(x, self.in_chans)
        grid = self.stem.dynamic_grid(x.shape[2], x.shape[3])
        if tuple(grid) != tuple(self.stem.grid_size):
            raise ValueError(
                f"input size {x.shape[2]}x{x.shape[3]} gives a {grid[0]}x{grid[1]} patch grid, but this Mixer's "
                f"token-mixing MLPs were built for {self.stem.img_size[0]}x{self.stem.img_size[1]} "
                f"({self.stem.grid_size[0]}x{self.stem.grid_size[1]} patches); resize the images or build the model "
                f"with img_size=({x.shape[2]}, {x.shape[3]})"
            )
        return self.stem(x), grid

    def _intermediates(self, x: torch.Tensor, take, norm: bool) -> tuple[torch.Tensor, list[Point]]:
        x, grid = self._embed(x)
        x, feats = self._run_blocks(self.blocks, x, grid, take, norm)
        return self.norm(x), feats


# ---------------------------------------------------------------------- variants
MIXER_PAPER = "MLP-Mixer: An all-MLP Architecture for Vision (Tolstikhin et al., 2021)"
_VARIANTS = {
    "mixer_s32_224": (32, 8, 512, None),
    "mixer_s16_224": (16, 8, 512, None),
    "mixer_b32_224": (32, 12, 768, None),
    "mixer_b16_224": (16, 12, 768, "timm/mixer_b16_224.goog_in21k_ft_in1k"),
    "mixer_l32_224": (32, 24, 1024, None),
    "mixer_l16_224": (16, 24, 1024, "timm/mixer_l16_224.goog_in21k_ft_in1k"),
}


_register = register_family("mixer", MlpMixer)


for _name, (_patch, _blocks, _dim, _hub) in _VARIANTS.items():
    _register(
        _name, dict(patch_size=_patch, num_blocks=_blocks, embed_dim=_dim), crop_pct=0.875, paper=MIXER_PAPER,
        hub_id=_hub, mean=INCEPTION_MEAN, std=INCEPTION_STD,
    )

_register(
    "test_mixer", dict(patch_size=8, num_blocks=2, embed_dim=64), img=32, crop_pct=1.0, paper="tiny test variant",
    notes="for tests; not a real model; fixed input size",
)

__all__ = ["MlpMixer"]
