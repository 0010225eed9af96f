"""Vector quantisers: one codebook, nearest-neighbour assignment, and how the codebook learns.

:class:`VectorQuantizer` is VQ-VAE's bottleneck (van den Oord et al. 2017): every latent vector
is replaced by its nearest code, the decoder's gradient is copied straight through to the
encoder, and the encoder is pulled towards its codes by the commitment loss. The codebook learns
either

- by exponential moving averages (``ema=True``; the paper's appendix, Razavi et al. 2019):
  ``N_i <- d N_i + (1 - d) n_i``, ``m_i <- d m_i + (1 - d) sum_{z -> i} z``, ``e_i = m_i / N~_i``
  with the counts Laplace-smoothed, ``N~_i = (N_i + eps) / (N + K eps) * N`` (``N = sum_i N_i``),
  so that a code that lost its vectors does not divide by zero; the loss is then the
  commitment term alone, ``beta * ||z - sg[e]||^2``;
- or by gradient (``ema=False``; the paper's main text): ``||sg[z] - e||^2 + beta * ||z - sg[e]||^2``.

Dead codes (``restart_dead``) follow Jukebox's rule (Dhariwal et al. 2020): an EMA of each
code's hits per training batch is kept (the ``N_i`` above, also kept when the codebook learns by
gradient); after each training forward, every code whose count is below ``dead_threshold``
(default 1: less than one hit per batch, on average over the last ~1 / (1 - decay) batches) is
re-initialised to a random vector the quantiser saw in this batch, with its count set to 1. At
the start every count is 0, so the first batch initialises the codebook from the data.

:class:`MultiScaleQuantizer` is VAR's residual quantiser (Tian et al. 2024, its
``VectorQuantizer2``): the latent ``f`` (B, D, g, g) is quantised coarse to fine over
``scales``: at scale ``s_k`` the residual ``f - f_hat`` is area-downsampled to ``s_k x s_k`` and
quantised with the one shared codebook; the codes are upsampled back to ``g x g`` (bicubic),
passed through a ``phi`` convolution and added to ``f_hat``. Its loss is VAR's, averaged over the
scales: ``beta * ||sg[f_hat_k] - f||^2 + ||f_hat_k - sg[f]||^2`` (the second term trains the
codebook and the ``phi`` convolutions; with an EMA codebook it trains only the ``phi``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.distributed import all_reduce_sum, group_device, is_dist
from ..errors import ConfigError

UPSAMPLE_MODES = ("bicubic", "bilinear")

# VAR's ImageNet schedule for a 16x16 latent; small latents get their own (7: Fashion-MNIST at 28 px).
_VAR_SCALES_16 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
_DEFAULT_SCALES = {7: (1, 2, 3, 4, 5, 7), 16: _VAR_SCALES_16}


def default_scales(grid: int) -> tuple[int, ...]:
    """The coarse-to-fine side lengths for a ``grid x grid`` latent: VAR's for 16, (1, 2, 3, 4, 5, 7)
    for 7, else VAR's 16-grid schedule rescaled to ``grid`` (increasing, ending at ``grid``)."""
    if grid in _DEFAULT_SCALES:
        return _DEFAULT_SCALES[grid]
    return tuple(sorted({max(1, round(s * grid / 16)) for s in _VAR_SCALES_16} | {grid}))


def check_scales(scales, grid: int) -> tuple[int, ...]:
    """``scales`` as a tuple of ints, or a :class:`ConfigError` saying what is wrong with it."""
    try:
        out = tuple(int(s) for s in scales)
    except (TypeError, ValueError):
        raise ConfigError(f"scales must be a list of increasing ints ending at the latent grid {grid}, got {scales!r}") from None
    if not out or any(s < 1 for s in out) or any(b <= a for a, b in zip(out, out[1:])) or out[-1] != grid:
        raise ConfigError(
            f"scales {list(out)} must be positive, strictly increasing and end at the latent grid {grid} "
            f"(img_size // 2**num_down), e.g. {list(default_scales(grid))}"
        )
    return out


def _broadcast_from_first(t: Tensor) -> Tensor:
    """Every process gets rank 0's ``t`` (restarted codes must be the same codes everywhere)."""
    if not is_dist():
        return t
    import torch.distributed as dist

    moved = t.to(group_device()).contiguous()
    dist.broadcast(moved, src=0)
    return moved.to(t.device)


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation of (B, D, H, W) latents against a (K, D) codebook.

    Args:
        codebook_size: K, the number of codes.
        embed_dim: D, the size of a code.
        ema: learn the codebook by moving averages (True) or by the codebook loss (False).
        decay: the moving averages' decay ``d`` (the EMA codebook and the hit counts).
        eps: Laplace smoothing of the EMA cluster sizes.
        commitment: ``beta``, the weight of the commitment loss (VQ-VAE: 0.25).
        restart_dead: re-initialise dead codes from this batch's quantiser inputs (see the module).
        dead_threshold: a code whose EMA hit count per batch falls below this is dead.

    State (buffers, saved with the weights, so a resumed run continues the same averages):
    ``codebook`` (K, D) (a parameter when ``ema=False``), ``cluster_size`` (K,) the EMA hit
    counts, ``embed_sum`` (K, D) the EMA sums of assigned vectors (``ema=True`` only).
    """

    def __init__(self, codebook_size: int, embed_dim: int, *, ema: bool = True, decay: float = 0.99,
                 eps: float = 1e-5, commitment: float = 0.25, restart_dead: bool = True, dead_threshold: float = 1.0):
        super().__init__()
        if codebook_size < 2 or embed_dim < 1:
            raise ConfigError(f"a codebook needs codebook_size >= 2 and embed_dim >= 1, got {codebook_size} and {embed_dim}")
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"decay must be in [0, 1), got {decay}")
        if commitment < 0:
            raise ConfigError(f"commitment must be >= 0, got {commitment}")
        self.codebook_size, self.embed_dim = codebook_size, embed_dim
        self.ema, self.decay, self.eps, self.commitment = bool(ema), float(decay), float(eps), float(commitment)
        self.restart_dead, self.dead_threshold = bool(restart_dead), float(dead_threshold)
        # VQGAN's initialisation; with restarts on, the first batch replaces it with data anyway.
        init = torch.empty(codebook_size, embed_dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if self.ema:
            self.register_buffer("codebook", init)
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))

    def extra_repr(self) -> str:
        return (f"K={self.codebook_size}, D={self.embed_dim}, ema={self.ema}, decay={self.decay}, "
                f"beta={self.commitment}, restart_dead={self.restart_dead}")

    # ------------------------------------------------------------------ lookup

    @torch.no_grad()
    def nearest(self, z: Tensor) -> Tensor:
        """(N, D) vectors -> (N,) index of the nearest code in squared Euclidean distance."""
        e = self.codebook.detach().float()
        z = z.detach().float()
        with torch.autocast(z.device.type, enabled=False):  # distances in float32 even under mixed precision
            d = z.square().sum(1, keepdim=True) - 2 * z @ e.T + e.square().sum(1)  # (N, K)
        return d.argmin(1)

    def lookup(self, indices: Tensor) -> Tensor:
        """(...,) code indices -> (..., D) codes (with the codebook's gradient when it learns by gradient)."""
        return F.embedding(indices.long(), self.codebook)

    def check_range(self, indices: Tensor) -> None:
        """A :class:`ConfigError` unless ``indices`` are integer code ids in 0..K-1 (tokens from elsewhere)."""
        if indices.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"code indices must be an integer tensor, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ConfigError(
                f"code index {int(indices.max() if indices.max() >= self.codebook_size else indices.min())} is outside "
                f"the codebook's 0..{self.codebook_size - 1}: were these tokens made by another tokenizer?"
            )

    # ------------------------------------------------------------------ training-time state

    @torch.no_grad()
    def update(self, z: Tensor, indices: Tensor) -> None:
        """One training step's codebook statistics from the quantised vectors ``z`` (N, D) and their codes (N,).

        Updates the hit counts, the EMA codebook (``ema=True``) and restarts dead codes. Summed
        over processes first, so every process holds the same codebook.
        """
        z = z.detach().float()
        k = self.codebook_size
        counts = torch.bincount(indices, minlength=k).float()  # (K,) n_i
        sums = torch.zeros(k, z.shape[1], device=z.device).index_add_(0, indices, z)  # (K, D) sum of z -> i
        counts, sums = all_reduce_sum(counts), all_reduce_sum(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.ema:
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n  # (K,) Laplace-smoothed N_i
            self.codebook.copy_(self.embed_sum / smoothed[:, None])
        if self.restart_dead:
            self.restart(z)

    @torch.no_grad()
    def restart(self, z: Tensor) -> int:
        """Re-initialise every code whose hit count is below ``dead_threshold`` to a random row of ``z`` (N, D).

        Returns how many codes were restarted. The restarted code counts as hit once.
        """
        dead = self.cluster_size < self.dead_threshold  # (K,)
        n_dead = int(dead.sum())
        if n_dead == 0 or z.shape[0] == 0:
            return 0
        pick = torch.randint(0, z.shape[0], (n_dead,), device=z.device)
        new = _broadcast_from_first(z[pick].to(self.codebook.dtype))  # (n_dead, D)
        self.codebook.data[dead] = new
        self.cluster_size[dead] = 1.0
        if self.ema:
            self.embed_sum[dead] = new
        return n_dead

    def code_stats(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """``usage`` (share of the K codes hit by ``indices``) and ``perplexity`` (exp of the entropy
        of the codes' frequencies: K when all are used equally, 1 when one code takes all)."""
        counts = torch.bincount(indices.flatten(), minlength=self.codebook_size).float()
        p = counts / counts.sum().clamp_min(1)
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
        return (counts > 0).float().mean(), perplexity

    # ------------------------------------------------------------------ forward

    def forward(self, z: Tensor) -> dict:
        # Codes, distances and losses in float32 (VAR turns autocast off here too).
        with torch.autocast(z.device.type, enabled=False):
            return self._quantize(z.float())

    def _quantize(self, z: Tensor) -> dict:
        """Quantise ``z`` (B, D, H, W).

        Returns ``quant`` (B, D, H, W): the codes, with the straight-through gradient to ``z``;
        ``loss`` (codebook + commitment; commitment only with an EMA codebook); ``indices``
        (B, H, W); ``usage``, ``perplexity``. In training mode the codebook statistics are updated.
        """
        B, D, H, W = z.shape
        if D != self.embed_dim:
            raise ConfigError(f"the quantiser takes {self.embed_dim}-channel latents, got {D}")
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (B*H*W, D)
        idx = self.nearest(flat)  # (B*H*W,)
        q = self.lookup(idx).view(B, H, W, D).permute(0, 3, 1, 2)  # (B, D, H, W)
        loss = self.commitment * F.mse_loss(z, q.detach())
        if not self.ema:
            loss = loss + F.mse_loss(q, z.detach())
        usage, perplexity = self.code_stats(idx)
        if self.training:
            self.update(flat, idx)
        quant = z + (q - z).detach()  # straight-through: the decoder's gradient reaches z unchanged
        return {"quant": quant, "loss": loss, "indices": idx.view(B, H, W), "usage": usage, "perplexity": perplexity}


class Phi(nn.Conv2d):
    """VAR's ``phi``: ``(1 - r) h + r conv3x3(h)``, a residual convolution on each upsampled scale."""

    def __init__(self, dim: int, ratio: float):
        super().__init__(dim, dim, kernel_size=3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: Tensor) -> Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class MultiScaleQuantizer(VectorQuantizer):
    """VAR's multi-scale residual quantiser over one shared codebook (see the module docstring).

    Args:
        scales: increasing side lengths, the last equal to the latent's grid.
        quant_resi: ``r`` of the ``phi`` convolutions; 0 turns them off (plain upsampled codes).
            Default 0.5, VAR's: the convolution repairs what upsampling a coarse code map blurs,
            and VAR reports it helps; it costs one small conv per scale.
        share_quant_resi: how many ``phi`` convolutions the scales share (VAR: 4, each scale
            takes the one whose tick in [0, 1] is nearest to its position ``k / (S - 1)``).
        upsample: "bicubic" (VAR's) or "bilinear", how code maps are brought to the full grid.
        **vq: the :class:`VectorQuantizer` arguments. VAR learns its codebook by gradient
            (``ema=False``); an EMA codebook averages the residuals of every scale.
    """

    def __init__(self, codebook_size: int, embed_dim: int, scales, *, quant_resi: float = 0.5,
                 share_quant_resi: int = 4, upsample: str = "bicubic", **vq):
        super().__init__(codebook_size, embed_dim, **vq)
        self.scales = check_scales(scales, int(scales[-1]) if len(scales) else 0)
        self.grid = self.scales[-1]
        if upsample not in UPSAMPLE_MODES:
            raise ConfigError(f"upsample {upsample!r} is not one of {', '.join(UPSAMPLE_MODES)}")
        if share_quant_resi < 1:
            raise ConfigError(f"share_quant_resi must be >= 1, got {share_quant_resi}")
        self.upsample, self.quant_resi = upsample, float(quant_resi)
        if abs(quant_resi) > 1e-6:
            self.phis = nn.ModuleList([Phi(embed_dim, quant_resi) for _ in range(share_quant_resi)])
            n = share_quant_resi
            # VAR's tick placement of the shared convolutions along the scales' positions in [0, 1].
            self.ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)
        else:
            self.phis = None
        # Something trainable between the codebook and f_hat: the codebook, or the phi convolutions.
        self._quant_path_trains = (not self.ema) or self.phis is not None

    def phi(self, k: int, h: Tensor) -> Tensor:
        """Scale ``k``'s ``phi`` applied to ``h`` (B, D, g, g) (identity when ``quant_resi`` is 0)."""
        if self.phis is None:
            return h
        at = k / max(len(self.scales) - 1, 1)
        return self.phis[int(np.argmin(np.abs(self.ticks - at)))](h)

    def down(self, x: Tensor, s: int) -> Tensor:
        """(B, D, g, g) -> (B, D, s, s) by area averaging (VAR's residual downsampling)."""
        return x if x.shape[-1] == s else F.interpolate(x, size=(s, s), mode="area")

    def up(self, h: Tensor) -> Tensor:
        """(B, D, s, s) -> (B, D, g, g) by ``upsample`` interpolation."""
        return h if h.shape[-1] == self.grid else F.interpolate(h, size=(self.grid, self.grid), mode=self.upsample)

    def scale_codes(self, k: int, indices: Tensor) -> Tensor:
        """Scale ``k``'s code map (B, s, s) (or (B, s*s)) -> its contribution ``phi(up(e))`` (B, D, g, g)."""
        s = self.scales[k]
        B = indices.shape[0]
        e = self.lookup(indices.reshape(B, s, s)).permute(0, 3, 1, 2)  # (B, D, s, s)
        return self.phi(k, self.up(e))

    def _quantize(self, f: Tensor) -> dict:
        """Quantise ``f`` (B, D, g, g) coarse to fine.

        Returns ``quant`` (B, D, g, g): ``f_hat`` with the straight-through gradient to ``f``;
        ``loss`` (VAR's, averaged over scales); ``indices``: a list of (B, s, s) per scale;
        ``usage``, ``perplexity`` over the codes of every scale. In training mode the codebook
        statistics are updated from the residuals quantised at every scale.
        """
        B, D, H, W = f.shape
        if D != self.embed_dim or H != self.grid or W != self.grid:
            raise ConfigError(f"the quantiser takes ({self.embed_dim}, {self.grid}, {self.grid}) latents, got {(D, H, W)}")
        f_nd = f.detach()
        rest = f_nd.clone()
        f_hat = torch.zeros_like(f)
        loss = f.new_zeros(())
        indices, seen, hits = [], [], []
        for k, s in enumerate(self.scales):
            z = self.down(rest, s).permute(0, 2, 3, 1).reshape(-1, D)  # (B*s*s, D) the residual at scale s
            idx = self.nearest(z)
            h = self.scale_codes(k, idx.view(B, s, s))  # (B, D, g, g)
            f_hat = f_hat + h
            rest = rest - h.detach()
            loss = loss + self.commitment * F.mse_loss(f_hat.detach(), f)
            if self._quant_path_trains:
                loss = loss + F.mse_loss(f_hat, f_nd)
            indices.append(idx.view(B, s, s))
            seen.append(z)
            hits.append(idx)
        loss = loss / len(self.scales)
        all_idx = torch.cat(hits)
        usage, perplexity = self.code_stats(all_idx)
        if self.training:
            self.update(torch.cat(seen), all_idx)
        quant = f + (f_hat - f).detach()  # straight-through, as VAR: the decoder's gradient reaches f unchanged
        return {"quant": quant, "loss": loss, "indices": indices, "usage": usage, "perplexity": perplexity}

    @torch.no_grad()
    def quantize_scales(self, f: Tensor) -> list[Tensor]:
        """The code maps of ``f`` (B, D, g, g), coarse to fine: a list of (B, s, s); no state changes."""
        B, D = f.shape[:2]
        rest = f.detach().float().clone()
        out = []
        for k, s in enumerate(self.scales):
            idx = self.nearest(self.down(rest, s).permute(0, 2, 3, 1).reshape(-1, D)).view(B, s, s)
            rest = rest - self.scale_codes(k, idx)
            out.append(idx)
        return out

    def codes_to_latent(self, indices: list[Tensor]) -> Tensor:
        """``f_hat`` (B, D, g, g), the sum of every scale's ``phi(up(e))``."""
        self.check_indices(indices)
        f_hat = 0
        for k, idx in enumerate(indices):
            f_hat = f_hat + self.scale_codes(k, idx)
        return f_hat

    def check_indices(self, indices: list[Tensor]) -> None:
        """A :class:`ConfigError` unless ``indices`` holds one (B, s, s) or (B, s*s) map per scale."""
        if len(indices) != len(self.scales):
            raise ConfigError(f"expected {len(self.scales)} code maps (scales {list(self.scales)}), got {len(indices)}")
        for k, (idx, s) in enumerate(zip(indices, self.scales)):
            if idx[0].numel() != s * s:
                raise ConfigError(f"code map {k} must be (B, {s}, {s}) for scale {s}, got {tuple(idx.shape)}")
            self.check_range(idx)


def grid_of(img_size: int, num_down: int) -> int:
    """The latent side ``img_size / 2**num_down``, or a :class:`ConfigError` when it does not divide."""
    f = 2 ** num_down
    if img_size % f:
        ok = [s for s in range(max(f, img_size - f), img_size + f + 1) if s % f == 0]
        raise ConfigError(
            f"img_size {img_size} is not divisible by 2**num_down = {f}: the tokenizer halves the image "
            f"{num_down} times; use an img_size like {' or '.join(map(str, ok[:2]))}, or another num_down"
        )
    return img_size // f


__all__ = [
    "MultiScaleQuantizer",
    "Phi",
    "UPSAMPLE_MODES",
    "VectorQuantizer",
    "check_scales",
    "default_scales",
    "grid_of",
]

