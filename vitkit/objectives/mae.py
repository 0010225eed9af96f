"""MAE (He et al., 2021): reconstruct the pixels of randomly masked patches from the visible ones.

The encoder (the backbone) runs on the visible patches only, through its token path:
``tokens, ctx = model.embed(x)`` then ``model.forward_tokens(tokens, ctx, keep=visible)``. A light
decoder with its own width, depth, fixed 2D sin-cos position embeddings and a learned mask token
sees every position and predicts each patch's pixels; the loss is the mean squared error over
the masked patches only. The run exports the encoder. A backbone whose stem mixes neighbouring
patches is refused (visible tokens would carry masked pixels) unless ``allow_mixing_stem``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.augment import Normalize
from ..data.transforms import TrainTransform
from ..engine.runtime import to_device
from ..layers import Block, sincos_2d_pos_embed
from .registry import register_objective
from .ssl import SelfSupervised, check_patch_local_stem, context_kwargs


@dataclass
class MAEConfig:
    """``objective.*`` keys of ``mae``."""

    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True
    crop_scale_min: float = 0.2
    allow_mixing_stem: bool = False  # train on a stem that mixes patches anyway (it sees what is masked)
    knn_k: int = 20
    knn: bool = True  # k-NN of the features at each evaluation (needs labels)


def patchify(images: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B, gh*gw, ph*pw*C) patches in row-major grid order (pixels of a patch: row, col, channel)."""
    B, C, H, W = images.shape
    gh, gw = grid
    ph, pw = H // gh, W // gw
    x = images[:, :, : gh * ph, : gw * pw].reshape(B, C, gh, ph, gw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, ph * pw * C)  # (B, L, p*p*C)


def unpatchify(patches: Tensor, grid: tuple[int, int], channels: int) -> Tensor:
    """Inverse of :func:`patchify`: (B, gh*gw, ph*pw*C) -> (B, C, gh*ph, gw*pw) for square patches."""
    B, L, P = patches.shape
    gh, gw = grid
    p = int(round((P // channels) ** 0.5))
    x = patches.reshape(B, gh, gw, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, gh * p, gw * p)


def random_keep(batch: int, length: int, mask_ratio: float, device=None) -> tuple[Tensor, Tensor]:
    """Per-sample random masking: (B, K) indices of the visible patches, sorted, and the (B, L) bool mask (True = masked)."""
    keep_n = max(1, int(round(length * (1 - mask_ratio))))
    order = torch.rand(batch, length, device=device).argsort(1)  # (B, L) a random permutation per sample
    keep = order[:, :keep_n].sort(1).values  # (B, K)
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    mask.scatter_(1, keep, False)
    return keep, mask


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """Mean squared error per patch, averaged over the masked patches only.

    pred, target: (B, L, P) patches; mask: (B, L) bool, True = masked (the only patches that count).
    ``norm_pix`` normalises each target patch by its own mean and variance first.
    """
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred - target).pow(2).mean(-1)  # (B, L)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1)


class MAEDecoder(nn.Module):
    """Encoder tokens (visible patches + prefix) -> predicted pixels of every patch.

    Its own width (``dim``), depth and heads; fixed 2D sin-cos position embeddings computed for
    whatever grid comes in; a learned mask token fills the masked positions.
    """

    def __init__(self, in_dim: int, patch_pixels: int, dim: int = 128, depth: int = 2, heads: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"objective.decoder_dim {dim} is not divisible by objective.decoder_heads {heads}")
        self.dim = dim
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio=4.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, keep: Tensor, grid: tuple[int, int], num_prefix: int) -> Tensor:
        """latent (B, prefix + K, D_enc), keep (B, K) -> (B, L, patch_pixels) for all L = gh*gw patches."""
        x = self.embed(latent)  # (B, prefix + K, d)
        B, _, d = x.shape
        L = grid[0] * grid[1]
        full = self.mask_token.to(x.dtype).expand(B, L, d).clone()
        full.scatter_(1, keep[..., None].expand(-1, -1, d), x[:, num_prefix:])  # visible back in place
        pos = sincos_2d_pos_embed(d, grid).to(x)  # (L, d)
        x = torch.cat([x[:, :num_prefix], full + pos], dim=1)  # (B, prefix + L, d)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x)[:, num_prefix:])  # (B, L, patch_pixels)


@register_objective("mae", MAEConfig)
class MAE(SelfSupervised):
    """Masked autoencoder around any backbone with ``embed`` / ``forward_tokens``.

    Args:
        model: the encoder; it must accept ``keep`` indices in ``forward_tokens``.
        patch_size, in_chans: the backbone's patch side and image channels (the decoder predicts
            ``patch_size**2 * in_chans`` values per patch).
        mask_ratio: fraction of the patches hidden from the encoder.
        norm_pix_loss: reconstruct each patch normalised by its own mean and variance.
        allow_mixing_stem: accept a stem that mixes neighbouring patches (conv stem, hybrid,
            overlapping embedding); refused by default, since the encoder would see masked pixels.
    """

    def __init__(self, model: nn.Module, patch_size: int, in_chans: int = 3, mask_ratio: float = 0.75,
                 decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4, norm_pix_loss: bool = True,
                 allow_mixing_stem: bool = False, **ssl_kw):
        super().__init__(model, **ssl_kw)
        if not 0 < mask_ratio < 1:
            raise ValueError(f"objective.mask_ratio must be in (0, 1), got {mask_ratio}")
        if not (callable(getattr(model, "embed", None)) and callable(getattr(model, "forward_tokens", None))):
            raise TypeError(f"MAE needs a backbone with embed() and forward_tokens(); {type(model).__name__} has none")
        check_patch_local_stem(model, "mae", allow_mixing_stem)
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch_size, self.in_chans = patch_size, in_chans
        self.decoder = MAEDecoder(self.embed_dim, patch_size * patch_size * in_chans, decoder_dim, decoder_depth,
                                  decoder_heads)

    @classmethod
    def from_config(cls, model: nn.Module, cfg: MAEConfig, **context) -> MAE:
        in_chans, h, w = model.card.input_size if hasattr(model, "card") else (3, 0, 0)
        patch = _patch_side(model, in_chans, h or 32)
        return cls(model, patch, in_chans, cfg.mask_ratio, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads,
                   cfg.norm_pix_loss, cfg.allow_mixing_stem, knn_k=cfg.knn_k, **context_kwargs(context, cfg.knn))

    @classmethod
    def train_pipeline(cls, cfg: MAEConfig, model: nn.Module, img_size: int, in_chans: int, mean, std):
        # MAE's augmentation: crops and flips only; masking is the regulariser.
        return TrainTransform(img_size, in_chans, scale=(cfg.crop_scale_min, 1.0)), Normalize(mean, std)

    def reconstruct(self, images: Tensor) -> dict[str, Tensor]:
        """One masked forward pass: ``pred`` and ``target`` patches (B, L, P), ``mask`` (B, L), ``grid``."""
        tokens, ctx = self.model.embed(images)
        B, L = images.shape[0], ctx.num_patches
        keep, mask = random_keep(B, L, self.mask_ratio, images.device)
        latent = self.model.forward_tokens(tokens, ctx, keep=keep)  # (B, prefix + K, D): visible only
        pred = self.decoder(latent, keep, ctx.grid, ctx.num_prefix_tokens)
        target = patchify(images, ctx.grid)
        if pred.shape[-1] != target.shape[-1]:
            raise ValueError(
                f"the MAE decoder predicts {pred.shape[-1]} values per patch but the {ctx.grid} grid of "
                f"{tuple(images.shape[2:])} images has {target.shape[-1]}: the input size must be a multiple of the patch size"
            )
        return {"pred": pred, "target": target, "mask": mask, "grid": ctx.grid}

    def forward(self, batch: dict) -> dict[str, Tensor]:
        r = self.reconstruct(batch["image"])
        loss = mae_loss(r["pred"].float(), r["target"].float(), r["mask"], self.norm_pix_loss)
        return {"loss": loss}

    @torch.no_grad()
    def on_fit_end(self, trainer) -> Path | None:
        """Write ``reconstruction.png`` (original / masked / reconstruction) from the first validation images."""
        if trainer.val_loader is None:
            return None
        batch = to_device(next(iter(trainer.val_loader)), trainer.device)
        if trainer.eval_transform is not None:
            batch = trainer.eval_transform(batch)
        was = self.training
        self.eval()
        try:
            path = write_reconstruction(self, batch["image"][:8], Path(trainer.out_dir) / "reconstruction.png")
        finally:
            self.train(was)
        return path


def _patch_side(model: nn.Module, in_chans: int, img: int) -> int:
    """The patch side, from the grid that ``embed`` makes of an image (no model internals)."""
    with torch.no_grad():
        _, ctx = model.embed(torch.zeros(1, in_chans, img, img, device=next(model.parameters()).device))
    return img // ctx.grid[0]


@torch.no_grad()
def write_reconstruction(mae: MAE, images: Tensor, path: Path) -> Path:
    """A figure of ``images`` (normalised (B, C, H, W)): rows original, masked input, reconstruction
    (predicted masked patches pasted between the visible ones), un-normalised with the model card's stats."""
    from matplotlib.figure import Figure

    r = mae.reconstruct(images)
    pred, target, mask, grid = r["pred"].float(), r["target"].float(), r["mask"], r["grid"]
    if mae.norm_pix_loss:  # predictions are in per-patch normalised units: map back with the true patch stats
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    c = images.shape[1]
    m = mask[..., None].float()
    masked = unpatchify(target * (1 - m), grid, c)  # masked patches at the mean colour
    recon = unpatchify(target * (1 - m) + pred * m, grid, c)
    orig = unpatchify(target, grid, c)
    card = getattr(mae.model, "card", None)
    mean = torch.tensor(card.mean if card else (0.5,) * c, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(card.std if card else (0.5,) * c, device=images.device).view(1, -1, 1, 1)

    def show(x: Tensor) -> Tensor:
        x = (x * std[:, :c] + mean[:, :c]).clamp(0, 1)  # (B, C, H, W) in [0, 1]
        return x.permute(0, 2, 3, 1).cpu()

    rows = [("original", show(orig)), ("masked", show(masked)), ("reconstruction", show(recon))]
    n = images.shape[0]
    fig = Figure(figsize=(1.6 * n, 1.7 * len(rows)))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for i, (name, imgs) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            img = imgs[j]
            ax.imshow(img[..., 0] if c == 1 else img, cmap="gray" if c == 1 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name)
    fig.suptitle(f"MAE, {mae.mask_ratio:.0%} of the patches masked")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
