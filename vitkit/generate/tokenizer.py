"""The image tokenizer: a convolutional VQ autoencoder in the VQGAN style, single- or multi-scale.

``VQTokenizer`` maps images in [-1, 1] (B, C, H, W) to a ``grid x grid`` latent with
``embed_dim`` channels (``grid = img_size / 2**num_down``), quantises it, and decodes back:

- ``quantizer="vq"``: one code per latent position (VQ-VAE), tokens (B, grid, grid) for MaskGIT;
- ``quantizer="multiscale"``: VAR's residual quantisation over ``scales`` (coarse to fine, one
  shared codebook), tokens a list of (B, s, s) maps for VAR's next-scale prediction.

The encoder and decoder follow VQGAN (Esser et al. 2021, taming-transformers): residual blocks of
GroupNorm, SiLU and 3x3 convolutions, a strided convolution to halve the resolution and
nearest-neighbour upsampling plus a convolution to double it. Sized for a CPU: VQGAN's
self-attention blocks at the lowest resolution are left out, and the registered variants use
one residual block per level (VQGAN: 2, this class's default); VQGAN's and VAR's ``quant_conv`` /
``post_quant_conv`` are folded into the encoder's last and the decoder's first convolution. The
quantisers and their state are in :mod:`vitkit.generate.quantize`.

Registered: ``vq_test``, ``vq_nano`` (single scale), ``msvq_test``, ``msvq_nano`` (multi-scale),
built with ``vitkit.generate.create_generator``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from .quantize import MultiScaleQuantizer, VectorQuantizer, check_scales, default_scales, grid_of
from .registry import register_generator

QUANTIZERS = ("vq", "multiscale")


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # VQGAN's 32 groups, fewer when the width is not a multiple of 32 (the CPU sizes).
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """VQGAN's ResnetBlock: norm, SiLU, conv3x3, norm, SiLU, dropout, conv3x3, plus a 1x1 shortcut when widths differ."""

    def __init__(self, cin: int, cout: int, groups: int = 32, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class Downsample(nn.Module):
    """Halve H and W: VQGAN's asymmetric pad (right, bottom) and a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _ConvStack(nn.Module):
    """``conv_in``, a body of blocks, then GroupNorm, SiLU and ``conv_out``: VQGAN's encoder and decoder alike."""

    def _finish(self, layers: list[nn.Module], channels: int, out: int, groups: int) -> None:
        self.body = nn.Sequential(*layers)
        self.norm_out = _norm(channels, groups)
        self.conv_out = nn.Conv2d(channels, out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


class Encoder(_ConvStack):
    """(B, C, H, W) -> (B, embed_dim, H / 2**n, W / 2**n), n = len(ch_mult) - 1."""

    def __init__(self, in_chans: int, width: int, ch_mult: tuple[int, ...], num_res_blocks: int, embed_dim: int,
                 groups: int = 32, dropout: float = 0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(in_chans, width, 3, padding=1)
        layers: list[nn.Module] = []
        c = width
        for i, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(c, width * m, groups, dropout))
                c = width * m
            if i < len(ch_mult) - 1:
                layers.append(Downsample(c))
        layers += [ResBlock(c, c, groups, dropout), ResBlock(c, c, groups, dropout)]  # VQGAN's middle, no attention
        self._finish(layers, c, embed_dim, groups)


class Decoder(_ConvStack):
    """(B, embed_dim, g, g) -> (B, C, g * 2**n, g * 2**n): the encoder mirrored, one more block per level (VQGAN)."""

    def __init__(self, out_chans: int, width: int, ch_mult: tuple[int, ...], num_res_blocks: int, embed_dim: int,
                 groups: int = 32, dropout: float = 0.0):
        super().__init__()
        c = width * ch_mult[-1]
        self.conv_in = nn.Conv2d(embed_dim, c, 3, padding=1)
        layers: list[nn.Module] = [ResBlock(c, c, groups, dropout), ResBlock(c, c, groups, dropout)]
        for i in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock(c, width * ch_mult[i], groups, dropout))
                c = width * ch_mult[i]
            if i > 0:
                layers.append(Upsample(c))
        self._finish(layers, c, out_chans, groups)


class VQTokenizer(nn.Module):
    """A VQ autoencoder for images in [-1, 1]: ``encode`` / ``decode`` tokens, ``forward`` for training.

    Args:
        img_size: the square images' side; must be divisible by ``2**num_down``.
        in_chans: image channels (1 grey, 3 RGB).
        width: channels of the first level; level i has ``width * ch_mult[i]``.
        num_down: how many times the encoder halves the image (grid = img_size / 2**num_down).
        embed_dim: channels of the latent and size of a code.
        codebook_size: K, the number of codes (tokens 0..K-1).
        quantizer: "vq" (one scale) or "multiscale" (VAR's residual quantiser).
        scales: multi-scale only: increasing sides ending at ``grid``; None: :func:`default_scales`
            ((1, 2, 3, 4, 5, 7) for a 7x7 grid).
        ema, decay, commitment, restart_dead, dead_threshold: the codebook (see
            :class:`~vitkit.generate.quantize.VectorQuantizer`). With ``ema=True`` (VQ-VAE's
            appendix) the codebook follows moving averages, for both quantisers; VAR itself learns its
            codebook by gradient: ``ema=False``.
        ch_mult: width multipliers per level (``num_down + 1`` of them); None: (1, 2, 2, ...).
        num_res_blocks: residual blocks per encoder level (the decoder has one more), VQGAN's 2.
        norm_groups: GroupNorm groups (VQGAN: 32; fewer when a width is not a multiple).
        dropout: in the residual blocks.
        quant_resi, share_quant_resi, upsample: multi-scale only, VAR's ``phi`` convolutions and
            the code maps' upsampling (see :class:`~vitkit.generate.quantize.MultiScaleQuantizer`).

    Attributes: ``img_size``, ``in_chans``, ``grid``, ``embed_dim``, ``codebook_size``, ``scales``
    (None for "vq"), ``quantizer`` (the module), ``quantizer_type``.

    ``decode`` and its kind return the decoder's output as is: close to [-1, 1] once trained but
    not clamped (the samplers clamp).
    """

    kind = "tokenizer"

    def __init__(self, img_size: int = 28, in_chans: int = 1, width: int = 64, num_down: int = 2, embed_dim: int = 32,
                 codebook_size: int = 512, quantizer: str = "vq", scales=None, ema: bool = True, decay: float = 0.99,
                 commitment: float = 0.25, restart_dead: bool = True, dead_threshold: float = 1.0, ch_mult=None,
                 num_res_blocks: int = 2, norm_groups: int = 32, dropout: float = 0.0, quant_resi: float = 0.5,
                 share_quant_resi: int = 4, upsample: str = "bicubic"):
        super().__init__()
        if quantizer not in QUANTIZERS:
            raise ConfigError(f"quantizer {quantizer!r} is not one of {', '.join(QUANTIZERS)}")
        if img_size < 1 or in_chans < 1 or width < 1 or num_down < 0 or num_res_blocks < 0:
            raise ConfigError(
                f"img_size, in_chans and width must be >= 1 and num_down, num_res_blocks >= 0; got img_size={img_size}, "
                f"in_chans={in_chans}, width={width}, num_down={num_down}, num_res_blocks={num_res_blocks}"
            )
        self.grid = grid_of(img_size, num_down)
        ch_mult = tuple(int(m) for m in ch_mult) if ch_mult is not None else (1,) + (2,) * num_down
        if len(ch_mult) != num_down + 1:
            raise ConfigError(f"ch_mult {list(ch_mult)} must have num_down + 1 = {num_down + 1} entries, one per level")
        self.img_size, self.in_chans, self.embed_dim, self.codebook_size = img_size, in_chans, embed_dim, codebook_size
        self.quantizer_type = quantizer
        vq = dict(ema=ema, decay=decay, commitment=commitment, restart_dead=restart_dead, dead_threshold=dead_threshold)
        if quantizer == "vq":
            if scales is not None:
                raise ConfigError("scales are for quantizer='multiscale'; a single-scale tokenizer takes none")
            self.scales = None
            self.quantizer = VectorQuantizer(codebook_size, embed_dim, **vq)
        else:
            self.scales = check_scales(default_scales(self.grid) if scales is None else scales, self.grid)
            self.quantizer = MultiScaleQuantizer(codebook_size, embed_dim, self.scales, quant_resi=quant_resi,
                                                 share_quant_resi=share_quant_resi, upsample=upsample, **vq)
        self.encoder = Encoder(in_chans, width, ch_mult, num_res_blocks, embed_dim, norm_groups, dropout)
        self.decoder = Decoder(in_chans, width, ch_mult, num_res_blocks, embed_dim, norm_groups, dropout)

    # ------------------------------------------------------------------ checks

    def _check_images(self, x: Tensor) -> None:
        want = (self.in_chans, self.img_size, self.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise DataError(
                f"this tokenizer takes images of shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}: "
                f"resize the data to {self.img_size} px with {self.in_chans} channel(s), or train a tokenizer for it"
            )

    def _need(self, quantizer: str, what: str) -> None:
        if self.quantizer_type != quantizer:
            other = "a multi-scale tokenizer (quantizer='multiscale', e.g. msvq_nano)" if quantizer == "multiscale" \
                else "a single-scale tokenizer (quantizer='vq', e.g. vq_nano)"
            raise ConfigError(f"{what} needs {other}; this one is quantizer={self.quantizer_type!r}")

    def no_weight_decay(self) -> set[str]:
        # Weight decay would pull the codes (a parameter when ema=False) towards 0; VQ-VAE has none.
        return {"quantizer.codebook"}

    # ------------------------------------------------------------------ training

    def encode_latent(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> the encoder's latent before quantisation (B, embed_dim, grid, grid)."""
        self._check_images(x)
        return self.encoder(x)

    def forward(self, x: Tensor) -> dict:
        """Encode, quantise (updating the codebook in training mode) and decode ``x`` (B, C, H, W).

        Returns ``recon`` (B, C, H, W); ``loss_vq`` (codebook + commitment, commitment only with an
        EMA codebook); ``indices`` (B, grid, grid), or a list of (B, s, s) per scale; ``usage``
        (share of the codes used in this batch) and ``perplexity``.
        """
        q = self.quantizer(self.encode_latent(x))
        return {"recon": self.decoder(q["quant"]), "loss_vq": q["loss"], "indices": q["indices"],
                "perplexity": q["perplexity"], "usage": q["usage"]}

    # ------------------------------------------------------------------ tokens

    def embed_indices(self, indices: Tensor) -> Tensor:
        """Code lookup: integer tokens (B, ...) -> codes (B, ..., embed_dim)."""
        self.quantizer.check_range(indices)
        return self.quantizer.lookup(indices)

    def decode_latent(self, f_hat: Tensor) -> Tensor:
        """A latent (B, embed_dim, grid, grid) (quantised or not) -> images (B, C, H, W)."""
        want = (self.embed_dim, self.grid, self.grid)
        if f_hat.ndim != 4 or tuple(f_hat.shape[1:]) != want:
            raise DataError(f"decode_latent takes latents of shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(f_hat.shape)}")
        return self.decoder(f_hat)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, grid, grid) (single-scale tokenizers)."""
        self._need("vq", "encode")
        f = self.encode_latent(x)  # (B, D, g, g)
        B, D, g, _ = f.shape
        return self.quantizer.nearest(f.permute(0, 2, 3, 1).reshape(-1, D)).view(B, g, g)

    def decode(self, indices: Tensor) -> Tensor:
        """Tokens (B, grid, grid) -> images (B, C, H, W) (single-scale tokenizers)."""
        self._need("vq", "decode")
        if indices.ndim != 3 or tuple(indices.shape[1:]) != (self.grid, self.grid):
            raise DataError(f"decode takes tokens of shape (B, {self.grid}, {self.grid}), got {tuple(indices.shape)}")
        return self.decode_latent(self.embed_indices(indices).permute(0, 3, 1, 2))  # (B, D, g, g)

    @torch.no_grad()
    def encode_scales(self, x: Tensor) -> list[Tensor]:
        """Images (B, C, H, W) -> token maps coarse to fine, a list of (B, s, s) (multi-scale tokenizers)."""
        self._need("multiscale", "encode_scales")
        return self.quantizer.quantize_scales(self.encode_latent(x))

    def decode_scales(self, indices: list[Tensor]) -> Tensor:
        """Token maps (a list of (B, s, s) or (B, s*s), one per scale) -> images (B, C, H, W)."""
        self._need("multiscale", "decode_scales")
        return self.decode_latent(self.quantizer.codes_to_latent(list(indices)))

    # ------------------------------------------------------------------ VAR's inputs

    def scales_to_var_input(self, indices: list[Tensor]) -> Tensor:
        """VAR's teacher-forcing input from the token maps of every scale (the last one is not needed).

        The input that predicts scale k+1 is the cumulative latent ``f_k = sum_{i<=k} phi_i(up(e(r_i)))``
        area-resized to ``s_{k+1} x s_{k+1}`` (VAR's ``idxBl_to_var_input``). Returns
        (B, sum(s*s for s in scales[1:]), embed_dim), scale by scale, row-major within each.
        """
        self._need("multiscale", "scales_to_var_input")
        q: MultiScaleQuantizer = self.quantizer  # type: ignore[assignment]
        n = len(self.scales)
        indices = list(indices)
        if len(indices) not in (n - 1, n):
            raise ConfigError(f"scales_to_var_input takes the token maps of the scales {list(self.scales)} "
                              f"({n}, or {n - 1} without the last), got {len(indices)}")
        for k in range(n - 1):
            if indices[k][0].numel() != self.scales[k] ** 2:
                raise DataError(f"token map {k} must be (B, {self.scales[k]}, {self.scales[k]}), got {tuple(indices[k].shape)}")
            q.check_range(indices[k])
        B = indices[0].shape[0]
        f_hat = torch.zeros(B, self.embed_dim, self.grid, self.grid, device=q.codebook.device)
        nxt = []
        for k in range(n - 1):
            f_hat = f_hat + q.scale_codes(k, indices[k])
            nxt.append(q.down(f_hat, self.scales[k + 1]).flatten(2).transpose(1, 2))  # (B, s_{k+1}^2, D)
        if not nxt:
            return f_hat.new_zeros(B, 0, self.embed_dim)
        return torch.cat(nxt, dim=1)  # (B, L - 1, D)

    def var_next_input(self, k: int, f_hat: Tensor | None, indices_k: Tensor) -> tuple[Tensor, Tensor | None]:
        """One step of VAR's sampling: add scale ``k``'s tokens (B, s_k, s_k) to ``f_hat`` (B, D, g, g).

        ``f_hat`` None (or zeros) starts from nothing. Returns the new ``f_hat`` and the input of
        scale k+1, (B, s_{k+1}^2, embed_dim), or None after the last scale (then ``decode_latent(f_hat)``
        gives the images). Chained over k, the inputs equal :meth:`scales_to_var_input`.
        """
        self._need("multiscale", "var_next_input")
        q: MultiScaleQuantizer = self.quantizer  # type: ignore[assignment]
        n = len(self.scales)
        if not 0 <= k < n:
            raise ConfigError(f"scale index k={k} is outside 0..{n - 1} (scales {list(self.scales)})")
        s = self.scales[k]
        if indices_k[0].numel() != s * s:
            raise DataError(f"the tokens of scale {k} must be (B, {s}, {s}), got {tuple(indices_k.shape)}")
        q.check_range(indices_k)
        h = q.scale_codes(k, indices_k)  # (B, D, g, g)
        f_hat = h if f_hat is None else f_hat + h
        if k == n - 1:
            return f_hat, None
        return f_hat, q.down(f_hat, self.scales[k + 1]).flatten(2).transpose(1, 2)  # (B, s_{k+1}^2, D)


# ---------------------------------------------------------------------- registered variants

_TEST = dict(img_size=28, in_chans=1, width=8, num_down=2, embed_dim=8, codebook_size=32, num_res_blocks=1)
# The CPU benchmark size (0.95M parameters): 0.16 G multiply-adds per 28 px image forward; a training step
# on 64 images took 1.2 s on one thread of a busy 2-core machine, so 20 minutes see an epoch or more.
_NANO = dict(img_size=28, in_chans=1, width=32, num_down=2, embed_dim=32, codebook_size=512, num_res_blocks=1)

register_generator("vq_test", "tokenizer", VQTokenizer, {**_TEST, "quantizer": "vq"})
register_generator("vq_nano", "tokenizer", VQTokenizer, {**_NANO, "quantizer": "vq"})
register_generator("msvq_test", "tokenizer", VQTokenizer, {**_TEST, "quantizer": "multiscale"})
register_generator("msvq_nano", "tokenizer", VQTokenizer, {**_NANO, "quantizer": "multiscale"})

__all__ = ["Decoder", "Downsample", "Encoder", "QUANTIZERS", "ResBlock", "Upsample", "VQTokenizer"]
