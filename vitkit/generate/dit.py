"""DiT (Peebles & Xie 2023): a diffusion transformer, here trained as a rectified flow.

The network is the reference's (github.com/facebookresearch/DiT, ``models.py``): the image (or a
latent map) is cut into patches by a convolution, a fixed 2-D sin-cos position embedding is
added, and every block is conditioned on ``c = t_emb + y_emb`` through adaLN-Zero: a SiLU +
linear regresses a shift, a scale and a gate for the attention and for the MLP branch from
``c``, and that linear starts at zero, so a fresh block is the identity and a fresh DiT outputs
zeros. The final layer is an adaLN-modulated norm and a zero-initialised linear that predicts
each patch's pixels. Parameter names follow the reference (``x_embedder``, ``t_embedder.mlp``,
``y_embedder.embedding_table``, ``blocks.N.adaLN_modulation.1``, ``final_layer.linear``).

Deviations from the reference, all because the objective is rectified flow and not DDPM:

- the output is the velocity only (the reference's ``learn_sigma`` doubles the channels to
  learn the DDPM variance, which a flow has no use for);
- ``t`` is continuous in [0, 1] (t = 0 data, t = 1 noise, SD3's convention); the timestep
  embedder sees ``t * t_scale`` with ``t_scale = 1000`` so its sinusoids span the same range as
  the reference's 1,000 integer DDPM steps (SD3 feeds its flow's time the same way);
- the class table always has ``num_classes + 1`` rows, the last being the null class used for
  classifier-free guidance; labels are dropped to it by the objective
  (:meth:`vitkit.objectives.generative.GenerativeObjective.drop_labels`), not inside the model
  as the reference's ``LabelEmbedder`` does.

Rectified flow (Liu et al. 2022; Esser et al. 2024, SD3): ``x_t = (1 - t) x0 + t noise`` and the
network regresses the constant velocity ``v = noise - x0`` (:func:`rectified_flow_loss`).
Sampling integrates ``dx/dt = v(x, t)`` from pure noise at t = 1 to t = 0 with Euler or Heun steps
and classifier-free guidance on the velocity (:func:`flow_sample`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from ..layers import Attention, Mlp, PatchEmbed, get_act_layer, sincos_2d_pos_embed
from .registry import register_generator

T_SAMPLING = ("uniform", "logit_normal")
SAMPLERS = ("euler", "heun")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN's affine step: x (B, L, D) scaled by 1 + scale and shifted, both (B, D) per sample."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, the reference's (GLIDE's) formula.

    ``t`` (B,) -> (B, dim) = [cos(t f_0), ..., cos(t f_{h-1}), sin(t f_0), ..., sin(t f_{h-1})] with
    h = dim // 2 and f_i = max_period ** (-i / h); an odd ``dim`` gets a trailing zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): the sinusoidal features of ``t * t_scale`` through Linear-SiLU-Linear."""

    def __init__(self, dim: int, freq_dim: int = 256, t_scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.t_scale = freq_dim, float(t_scale)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_embedding(t * self.t_scale, self.freq_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class ids (B,) in [0, num_classes] -> (B, D); row ``num_classes`` is the null class."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """A transformer block conditioned by adaLN-Zero.

    ``x = x + gate_msa * attn(modulate(norm1(x), shift_msa, scale_msa))``, then the same for the
    MLP, with the six (B, D) vectors regressed from the condition ``c`` by SiLU + Linear. The norms
    have no affine parameters (the modulation replaces them) and the Linear starts at zero, so
    every gate is 0 and a fresh block returns its input unchanged.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=get_act_layer("gelu_tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, L, D) tokens, c (B, D) the condition."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a Linear to each patch's ``patch_size**2 * out_chans`` values."""

    def __init__(self, dim: int, patch_size: int, out_chans: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_chans)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional diffusion transformer that predicts a rectified flow's velocity.

    Args:
        img_size: side of the square input (pixels, or the latent grid when trained on latents).
        in_chans: channels of the input (and of the predicted velocity).
        num_classes: number of real classes; id ``num_classes`` is the null class ("no class").
        patch_size: side of a patch (must divide ``img_size``).
        dim, depth, num_heads, mlp_ratio: the transformer's width, blocks, heads and MLP ratio
            (the defaults are DiT-S/2).
        freq_dim: sinusoidal features of the timestep before its MLP (the reference's 256).
        t_scale: the timestep embedder sees ``t * t_scale``; 1000 maps t in [0, 1] onto the
            reference's DDPM step range.

    ``forward(x_t, t, labels)``: x_t (B, in_chans, img_size, img_size), t (B,) (or a scalar) in
    [0, 1], labels (B,) in [0, num_classes] -> the velocity, shaped like x_t.
    """

    kind = "dit"

    def __init__(self, img_size: int, in_chans: int, num_classes: int, patch_size: int = 2, dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, freq_dim: int = 256,
                 t_scale: float = 1000.0):
        super().__init__()
        if img_size < 1 or patch_size < 1 or img_size % patch_size:
            raise ConfigError(f"DiT: img_size {img_size} must be a positive multiple of patch_size {patch_size}; "
                              "choose a patch size that divides the image (or latent grid) side")
        if num_classes < 0 or in_chans < 1 or depth < 1:
            raise ConfigError(f"DiT: num_classes ({num_classes}) must be >= 0, in_chans ({in_chans}) and depth "
                              f"({depth}) >= 1")
        if num_heads < 1 or dim % num_heads or dim % 4:
            raise ConfigError(f"DiT: dim {dim} must be divisible by num_heads {num_heads} and by 4 "
                              "(the 2-D sin-cos position embedding)")
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.patch_size, self.dim = patch_size, dim
        self.grid = img_size // patch_size
        self.x_embedder = PatchEmbed(img_size, patch_size, in_chans, dim, bias=True)
        self.t_embedder = TimestepEmbedder(dim, freq_dim, t_scale)
        self.y_embedder = LabelEmbedder(num_classes, dim)
        # Fixed, so a buffer rebuilt at construction rather than a saved parameter.
        self.register_buffer("pos_embed", sincos_2d_pos_embed(dim, (self.grid, self.grid))[None], persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(dim, patch_size, in_chans)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The reference's initialisation: Xavier-uniform linears with zero biases, the patch
        projection initialised as a linear, N(0, 0.02) class table and timestep MLP, and every
        adaLN modulation and the output linear at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, L, p*p*C) per-patch values (row, column, channel) -> (B, C, H, W)."""
        B = x.shape[0]
        p, g, c = self.patch_size, self.grid, self.in_chans
        x = x.reshape(B, g, g, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, c, g * p, g * p)  # (B, C, g, p, g, p) -> (B, C, H, W)

    def forward(self, x_t: Tensor, t: Tensor | float, labels: Tensor) -> Tensor:
        B = x_t.shape[0]
        if tuple(x_t.shape[1:]) != (self.in_chans, self.img_size, self.img_size):
            raise DataError(f"DiT takes (B, {self.in_chans}, {self.img_size}, {self.img_size}) inputs, got "
                            f"{tuple(x_t.shape)}: resize the data to the model's size or build the model for it")
        t = torch.as_tensor(t, device=x_t.device, dtype=x_t.dtype)
        t = t.expand(B) if t.ndim == 0 else t
        if t.shape != (B,) or labels.shape != (B,):
            raise DataError(f"DiT needs one t and one label per image: got t {tuple(t.shape)}, labels "
                            f"{tuple(labels.shape)} for {B} images")
        x = self.x_embedder(x_t)  # (B, L, D)
        x = x + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(labels)  # (B, D)
        for blk in self.blocks:
            x = blk(x, c)  # (B, L, D)
        x = self.final_layer(x, c)  # (B, L, p*p*C)
        return self.unpatchify(x)


def _draw(kind: str, shape: tuple, generator: torch.Generator | None, device) -> Tensor:
    """Standard normal or uniform draws on the generator's device (so a seeded CPU generator gives
    the same numbers for any model device), then moved to ``device``."""
    where = generator.device if generator is not None else device
    fn = torch.randn if kind == "normal" else torch.rand
    return fn(shape, generator=generator, device=where).to(device)


def sample_t(n: int, t_sampling: str = "uniform", *, generator: torch.Generator | None = None, device=None,
             logit_mean: float = 0.0, logit_std: float = 1.0) -> Tensor:
    """Training times (n,) in [0, 1]: ``uniform`` (rectified flow) or ``logit_normal``,
    t = sigmoid(u) with u ~ N(logit_mean, logit_std) (SD3's default m = 0, s = 1), which spends
    more of the training on the middle of the path."""
    if t_sampling == "uniform":
        return _draw("uniform", (n,), generator, device)
    if t_sampling == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * _draw("normal", (n,), generator, device))
    raise ConfigError(f"t_sampling {t_sampling!r} is not one of {T_SAMPLING}")


def rectified_flow_loss(model: nn.Module, x0: Tensor, labels: Tensor, *, generator: torch.Generator | None = None,
                        t_sampling: str = "uniform", t: Tensor | None = None,
                        noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rectified-flow loss of ``model`` on data ``x0`` (B, C, H, W): (mean loss, per-sample loss (B,)).

    ``x_t = (1 - t) x0 + t noise`` with noise ~ N(0, I) and t drawn per sample by ``t_sampling``
    (:func:`sample_t`); the target is the velocity ``noise - x0`` and the loss its mean squared
    error over C, H, W. ``t`` and ``noise`` may be given instead of drawn; ``generator`` (on any
    device) makes the draws reproducible.
    """
    B = x0.shape[0]
    if t is None:
        t = sample_t(B, t_sampling, generator=generator, device=x0.device)
    if noise is None:
        noise = _draw("normal", tuple(x0.shape), generator, x0.device)
    t = t.to(x0.dtype)
    tb = t.view(B, *([1] * (x0.ndim - 1)))  # (B, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * noise
    target = noise - x0
    v = model(x_t, t, labels)
    per_sample = (v.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    return per_sample.mean(), per_sample


def _guided_velocity(model: nn.Module, x: Tensor, t: float, labels: Tensor, null: int, guidance: float) -> Tensor:
    """One model call: the velocity at (x, t), guided as ``u + guidance * (c - u)``.

    guidance 1 is the plain conditional velocity and 0 the unconditional one (each a single
    batch); any other value runs the conditional and unconditional halves as one 2B batch.
    """
    B = x.shape[0]
    tt = torch.full((B,), t, device=x.device, dtype=x.dtype)
    if guidance == 1.0:
        return model(x, tt, labels)
    nulls = torch.full_like(labels, null)
    if guidance == 0.0:
        return model(x, tt, nulls)
    v = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, nulls]))  # (2B, C, H, W)
    c, u = v.chunk(2)
    return u + guidance * (c - u)


@torch.no_grad()
def flow_sample(model: nn.Module, labels: Tensor, *, steps: int = 32, method: str = "euler", guidance: float = 1.0,
                generator: torch.Generator | None = None, noise: Tensor | None = None,
                clamp: bool = True) -> Tensor:
    """Integrate the flow ``dx/dt = v(x, t)`` from noise at t = 1 to data at t = 0 in ``steps``
    uniform steps; returns (B, C, H, W) (clamped to [-1, 1] unless ``clamp=False``, for latents).

    ``method``: ``euler`` (one model call per step, ``steps`` calls) or ``heun`` (Heun's
    second-order method: an Euler predictor, then the average of the velocities at both ends;
    two calls per step, ``2 * steps`` calls, the last step included). Classifier-free guidance
    on the velocity: ``u + guidance * (c - u)`` with ``c`` conditional on ``labels`` and ``u`` on
    the null class ``model.num_classes``; 1 is plain conditional, 0 unconditional, anything else
    batches both halves in each call. ``noise`` (B, C, H, W) is the start at t = 1 (default:
    N(0, I) from ``generator``). ``model`` needs ``in_chans``, ``img_size`` and ``num_classes``
    attributes.
    """
    if method not in SAMPLERS:
        raise ConfigError(f"flow_sample: method {method!r} is not one of {SAMPLERS}")
    if steps < 1:
        raise ConfigError(f"flow_sample: steps must be >= 1, got {steps}")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else labels.device
    dtype = param.dtype if param is not None else None  # a parameter-free field keeps the noise's dtype
    labels = labels.to(device)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > model.num_classes):
        raise DataError(f"flow_sample: labels must be class ids in [0, {model.num_classes}] "
                        f"({model.num_classes} = no class), got {labels.min().item()}..{labels.max().item()}")
    if noise is None:
        shape = (labels.shape[0], model.in_chans, model.img_size, model.img_size)
        noise = _draw("normal", shape, generator, device)
    x = noise.to(device=device, dtype=dtype or noise.dtype)
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t  # negative: integrating backwards in time
        v = _guided_velocity(model, x, t, labels, model.num_classes, guidance)
        if method == "euler":
            x = x + dt * v
        else:
            v_next = _guided_velocity(model, x + dt * v, t_next, labels, model.num_classes, guidance)
            x = x + dt * 0.5 * (v + v_next)
    return x.clamp(-1, 1) if clamp else x


_BASE = dict(img_size=28, in_chans=1, num_classes=10, mlp_ratio=4.0, freq_dim=256, t_scale=1000.0)
# For tests: well under a second a step at 28 px on one CPU thread.
register_generator("dit_test", "dit", DiT, dict(_BASE, patch_size=4, dim=32, depth=2, num_heads=2))
# The CPU benchmark size: 4-pixel patches on 28 px (a 7 x 7 grid, 49 tokens), 6 blocks of width 128
# (about 1.8M parameters): small enough for a couple of epochs of Fashion-MNIST in 20 minutes on 2 cores.
register_generator("dit_nano", "dit", DiT, dict(_BASE, patch_size=4, dim=128, depth=6, num_heads=4))

__all__ = ["DiT", "DiTBlock", "FinalLayer", "LabelEmbedder", "TimestepEmbedder", "flow_sample", "modulate",
           "rectified_flow_loss", "sample_t", "timestep_embedding"]
