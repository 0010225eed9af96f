"""DPT: the Dense Prediction Transformer's decoder (Ranftl et al., "Vision Transformers for Dense
Prediction", 2021), for segmentation and depth.

Reassemble: the tokens of four blocks of a plain ViT become image-like maps. The readout (class)
token is dropped (``ignore``), added to every patch token (``add``) or concatenated to each and
projected back with Linear + GELU (``project``, DPT's default); a 1x1 conv projects each map to
its level's channels and a transposed conv (x4, x2), nothing (x1) or a strided 3x3 conv (x1/2)
resamples it, so that the levels sit at 1/4, 1/8, 1/16 and 1/32 of the input for patch 16. A 3x3
conv brings each level to ``features`` channels.

Fusion: RefineNet-style blocks from the deepest level up; each adds the next finer level (through
a residual conv unit) to the upsampled path, refines it with a second unit, upsamples x2
(bilinear, align_corners=True) and mixes with a 1x1 conv. The result is at 1/2 of the input.

Output: depth is conv 3x3 (features/2) -> x2 upsampling -> conv 3x3 (32) -> ReLU -> conv 1x1 ->
ReLU, non-negative like DPT's; segmentation is conv 3x3 -> BatchNorm -> ReLU -> dropout -> conv
1x1 -> x2 upsampling. For patch 16 both come out at the input's resolution.

A hierarchical backbone (Swin, PVT, ConvNeXt, ...) gives its four pyramid maps directly: there is
no readout and no resampling, only the 3x3 convs, the fusion and the output head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ..registry import register_head

READOUTS = ("ignore", "add", "project")
# DPT's per-level channels for its ViT-B/16 and ViT-L/16 backbones, by embedding width.
_NECK_CHANS = {768: (96, 192, 384, 768), 1024: (256, 512, 1024, 1024)}
_DEPTH_HIDDEN = 32  # channels before the last 1x1 conv of DPT's depth head


def default_layers(depth: int, levels: int = 4) -> list[int]:
    """DPT's blocks for ``levels`` levels, spread evenly: [2, 5, 8, 11] for 12 blocks, [5, 11, 17, 23] for 24."""
    return [max(0, round(depth * (k + 1) / levels) - 1) for k in range(levels)]


def default_neck_chans(embed_dim: int, levels: int = 4) -> list[int]:
    """DPT's per-level channels: (96, 192, 384, 768) for width 768, (256, 512, 1024, 1024) for 1024,
    else the ViT-B rule D/8, D/4, D/2, D."""
    if levels == 4 and embed_dim in _NECK_CHANS:
        return list(_NECK_CHANS[embed_dim])
    return [max(1, embed_dim // 2 ** (levels - 1 - k)) for k in range(levels)]


def _resampler(chans: int, factor: float) -> nn.Module:
    """x factor: a transposed conv (kernel = stride = factor) up, a strided 3x3 conv down."""
    if factor == 1:
        return nn.Identity()
    if factor > 1:
        if factor != int(factor):
            raise ConfigError(f"DPT resample factor {factor} must be a whole number when it upsamples (4, 2)")
        f = int(factor)
        return nn.ConvTranspose2d(chans, chans, kernel_size=f, stride=f)
    inv = 1 / factor
    if factor <= 0 or abs(inv - round(inv)) > 1e-6:
        raise ConfigError(f"DPT resample factor {factor} must be 1/n when it downsamples (0.5, 0.25)")
    return nn.Conv2d(chans, chans, kernel_size=3, stride=round(inv), padding=1)


class Reassemble(nn.Module):
    """One level: readout, 1x1 projection to ``chans``, resampling, 3x3 conv to ``features``.

    ``chans=None`` (a hierarchical backbone's map) skips the projection and the resampling.
    """

    def __init__(self, dim: int, chans: int | None, factor: float, features: int, readout: str):
        super().__init__()
        self.mode = readout
        self.readout = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU()) if readout == "project" else None
        self.proj = nn.Conv2d(dim, chans, kernel_size=1) if chans is not None else nn.Identity()
        self.resample = _resampler(chans, factor) if chans is not None else nn.Identity()
        self.conv = nn.Conv2d(chans if chans is not None else dim, features, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor, readout: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, D, h, w) patch tokens as a map; readout: (B, D) the readout token (project / add)."""
        if self.mode == "project":
            B, D, h, w = x.shape
            t = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
            t = self.readout(torch.cat([t, readout[:, None].expand_as(t)], dim=-1))
            x = t.transpose(1, 2).reshape(B, D, h, w)
        elif self.mode == "add":
            x = x + readout[:, :, None, None]
        return self.conv(self.resample(self.proj(x)))


class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit: x + conv(relu(conv(relu(x)))), BatchNorm after each conv when ``bn``."""

    def __init__(self, dim: int, bn: bool, bias: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(dim) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(dim) if bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(F.relu(x)))
        return x + self.bn2(self.conv2(F.relu(out)))


class FusionBlock(nn.Module):
    """RefineNet-style fusion: path (+ unit(skip)) -> unit -> bilinear upsampling -> 1x1 conv.

    The deepest block has no skip and so no first unit (DPT builds one it never runs).
    """

    def __init__(self, dim: int, bn: bool, bias: bool, has_skip: bool):
        super().__init__()
        self.res1 = ResidualConvUnit(dim, bn, bias) if has_skip else None
        self.res2 = ResidualConvUnit(dim, bn, bias)
        self.out_conv = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size: tuple[int, int] | None = None):
        """``size``: where the next finer level is; x2 when None. They agree whenever the grid halves
        evenly; on an odd grid the path is resized to the skip, as MiDaS v3.1 does."""
        if skip is not None:
            x = x + self.res1(skip)
        x = self.res2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


def depth_output(features: int, out_chans: int) -> nn.Sequential:
    """DPT's depth head: conv 3x3 -> x2 -> conv 3x3 -> ReLU -> conv 1x1 -> ReLU (non-negative)."""
    return nn.Sequential(
        nn.Conv2d(features, features // 2, kernel_size=3, padding=1),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(features // 2, _DEPTH_HIDDEN, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(_DEPTH_HIDDEN, out_chans, kernel_size=1),
        nn.ReLU(),
    )


def segment_output(features: int, out_chans: int, dropout: float) -> nn.Sequential:
    """DPT's segmentation head: conv 3x3 -> BN -> ReLU -> dropout -> conv 1x1 -> x2."""
    return nn.Sequential(
        nn.Conv2d(features, features, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(features),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Conv2d(features, out_chans, kernel_size=1),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
    )


def _is_isotropic(backbone: nn.Module) -> bool:
    return len({str(f["reduction"]) for f in backbone.feature_info}) == 1


@register_head("dpt", tasks=("segment", "depth"))
class DPTHead(nn.Module):
    """DPT's reassemble + fusion decoder with its depth or segmentation head (see the module docstring).

    Args:
        backbone: the vitkit backbone it decodes (read through its public API, not stored).
        out_chans: classes for segmentation, 1 for depth.
        task: "segment" or "depth"; None takes depth for ``out_chans == 1``, segmentation otherwise.
        layers: the block read at each level, shallow to deep (plain ViTs; negatives count back).
            Default: spread like DPT's [2, 5, 8, 11] for 12 blocks and [5, 11, 17, 23] for 24.
        features: channels of the fusion path (DPT: 256).
        neck_chans: channels of each level before its 3x3 conv. Default: DPT's (96, 192, 384, 768)
            for ViT-B, (256, 512, 1024, 1024) for ViT-L, else D/8, D/4, D/2, D.
        readout: "ignore" | "add" | "project"; None is "project" (DPT's default) where the
            backbone has a class token and "ignore" where it has none.
        resample: each level's resampling factor (DPT: 4, 2, 1, 0.5).
        fusion_bn: BatchNorm in the fusion's residual units; None follows DPT (on for
            segmentation, off for depth).
        fusion_bias: biases in those convs; None is ``not fusion_bn`` (DPT's).
        dropout: before the segmentation classifier (DPT: 0.1).
        depth_projection: a 3x3 conv + ReLU before the depth head, as some later DPT depth
            checkpoints have (transformers' ``add_projection``); off in DPT.

    ``forward(backbone, x)`` returns (B, out_chans, H * 16 / p, W * 16 / p) for a ViT of patch p
    (``output_stride`` = p / 16 input pixels per output pixel).
    """

    def __init__(
        self,
        backbone: nn.Module,
        out_chans: int,
        *,
        task: str | None = None,
        layers: Sequence[int] | None = None,
        features: int = 256,
        neck_chans: Sequence[int] | None = None,
        readout: str | None = None,
        resample: Sequence[float] = (4, 2, 1, 0.5),
        fusion_bn: bool | None = None,
        fusion_bias: bool | None = None,
        dropout: float = 0.1,
        depth_projection: bool = False,
    ):
        super().__init__()
        task = task if task is not None else ("depth" if out_chans == 1 else "segment")
        if task not in ("segment", "depth"):
            raise ConfigError(f"the DPT head serves task 'segment' or 'depth', got {task!r}")
        if out_chans < 1:
            raise ConfigError(f"the DPT head needs out_chans >= 1 (classes, or 1 for depth), got {out_chans}")
        if features < 2:
            raise ConfigError(f"DPT features must be >= 2, got {features}")
        if depth_projection and task != "depth":
            raise ConfigError("depth_projection applies to the depth head only (task='depth')")
        self.task = task
        fusion_bn = task == "segment" if fusion_bn is None else bool(fusion_bn)
        fusion_bias = not fusion_bn if fusion_bias is None else bool(fusion_bias)

        if _is_isotropic(backbone):
            self._init_plain(backbone, features, layers, neck_chans, readout, resample)
        else:
            self._init_pyramid(backbone, features, layers, neck_chans, readout)
        n = len(self.reassemble)
        self.fusion = nn.ModuleList(FusionBlock(features, fusion_bn, fusion_bias, has_skip=i < n - 1) for i in range(n))
        if task == "depth":
            self.project = (
                nn.Sequential(nn.Conv2d(features, features, kernel_size=3, padding=1), nn.ReLU())
                if depth_projection else nn.Identity()
            )
            self.output = depth_output(features, out_chans)
        else:
            self.project = nn.Identity()
            self.output = segment_output(features, out_chans, dropout)

    def _init_plain(self, backbone, features, layers, neck_chans, readout, resample) -> None:
        depth = len(backbone.feature_info)
        dim = backbone.feature_info[-1]["num_chs"]
        layers = list(default_layers(depth) if layers is None else layers)
        if not layers:
            raise ConfigError("DPT needs at least one entry in layers")
        for i in layers:
            if not -depth <= i < depth:
                raise ConfigError(f"DPT layer {i} is out of range for a backbone with {depth} blocks (0..{depth - 1})")
        self.layers = [i % depth for i in layers]
        n = len(self.layers)
        neck_chans = list(default_neck_chans(dim, n) if neck_chans is None else neck_chans)
        resample = list(resample)
        if len(neck_chans) != n or len(resample) != n:
            raise ConfigError(
                f"DPT reads {n} layers {self.layers} but has {len(neck_chans)} neck_chans and {len(resample)} "
                "resample factors: give one of each per layer"
            )
        has_cls = getattr(backbone, "has_class_token", backbone.num_prefix_tokens > 0)
        if readout is None:
            readout = "project" if has_cls else "ignore"
        if readout not in READOUTS:
            raise ConfigError(f"DPT readout must be one of {READOUTS}, got {readout!r}")
        if readout != "ignore" and not has_cls:
            raise ConfigError(
                f"DPT readout {readout!r} reads the class token, and this backbone has none; "
                "use readout='ignore' (model.head_args: {readout: ignore})"
            )
        self.readout = readout
        # DPT's "add" averages the class and distillation tokens of a distilled ViT.
        self.readout_tokens = 2 if readout == "add" and getattr(backbone, "distilled", False) else 1
        self.pyramid = False
        self.reassemble = nn.ModuleList(
            Reassemble(dim, c, f, features, readout) for c, f in zip(neck_chans, resample)
        )
        r = backbone.feature_info[0]["reduction"]
        r = r[0] if isinstance(r, (tuple, list)) else r
        self.output_stride = r / resample[0] / 4

    def _init_pyramid(self, backbone, features, layers, neck_chans, readout) -> None:
        name = type(backbone).__name__
        if layers is not None or neck_chans is not None or readout not in (None, "ignore"):
            raise ConfigError(
                f"{name} is hierarchical: DPT takes its four pyramid maps as they are, so layers, neck_chans "
                "and readout do not apply; leave them unset"
            )
        info = backbone.pyramid_info()
        strides = [i["reduction"] for i in info]
        if any(not isinstance(s, (int, float)) for s in strides) or strides != sorted(set(strides)):
            raise ConfigError(
                f"DPT needs pyramid maps at increasing strides; {name} gives {strides}. "
                "Use a plain ViT or a backbone with a 4-level pyramid"
            )
        self.layers = None
        self.readout = "ignore"
        self.readout_tokens = 1
        self.pyramid = True
        self.reassemble = nn.ModuleList(Reassemble(i["num_chs"], None, 1, features, "ignore") for i in info)
        self.output_stride = strides[0] / 4

    def _levels(self, backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """The reassembled levels, finest first, each (B, features, h_i, w_i)."""
        if self.pyramid:
            maps = backbone.forward_intermediates(x, pyramid=True, intermediates_only=True)
            return [r(m) for r, m in zip(self.reassemble, maps)]
        unique = sorted(set(self.layers))
        if self.readout == "ignore":
            feats = backbone.forward_intermediates(x, indices=unique, intermediates_only=True)
            by_layer = {i: (f, None) for i, f in zip(unique, feats)}
        else:
            feats = backbone.forward_intermediates(x, indices=unique, intermediates_only=True, return_prefix_tokens=True)
            if any(p.shape[1] < self.readout_tokens for _, p in feats):
                raise ConfigError(
                    f"DPT readout {self.readout!r} needs the class token in the outputs of blocks {unique}, and "
                    f"{type(backbone).__name__} has none there; use readout='ignore' (model.head_args: {{readout: ignore}})"
                )
            by_layer = {i: (f, p[:, :self.readout_tokens].mean(1)) for i, (f, p) in zip(unique, feats)}
        return [r(*by_layer[i]) for r, i in zip(self.reassemble, self.layers)]

    def forward(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, out_chans, h, w) logits or depth at ``output_stride``."""
        levels = self._levels(backbone, x)
        path = None
        for i in reversed(range(len(levels))):
            size = tuple(levels[i - 1].shape[-2:]) if i > 0 else None
            path = self.fusion[i](levels[i] if path is None else path, None if path is None else levels[i], size)
        return self.output(self.project(path))


__all__ = ["DPTHead", "default_layers", "default_neck_chans"]
