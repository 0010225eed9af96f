"""VAR (Tian et al., 2024): visual autoregressive modelling by next-scale prediction.

A multi-scale residual tokenizer turns an image into token maps r_1, ..., r_K of growing sides
``scales`` (e.g. 1, 2, 3, 4, 5, 7). VAR predicts all tokens of scale k at once from the class and
every coarser scale: the sequence is the K maps flattened coarse to fine (L = sum s*s tokens),
and a block-causal mask lets a token attend to its own scale and all coarser ones.

As in the reference (github.com/FoundationVision/VAR, ``models/var.py``):

- the class embedding has ``num_classes + 1`` rows (the last is the null class of
  classifier-free guidance); it is the start token (scale 1x1, plus a learned ``pos_start``)
  and the condition of every adaLN;
- the input of scale k+1 is the tokenizer's cumulative reconstruction after scale k resized to
  side s_{k+1} (``scales_to_var_input`` in training, ``var_next_input`` when sampling), projected
  by ``word_embed`` from the tokenizer's ``embed_dim`` to the model width; each token adds a
  level (scale) embedding and its absolute position embedding;
- blocks are adaLN transformer blocks: LayerNorm without affine, modulated by
  ``(1 + scale, shift)`` and a gate ``gamma`` on each branch, all six from the class embedding
  (``ada_lin``: SiLU + Linear per block; ``shared_aln=True`` is the reference's shared variant,
  one linear for all blocks plus a learned per-block offset ``ada_gss``); the head has its own
  adaLN (scale and shift) before the linear layer onto the codebook;
- attention normalises queries and keys (``attn_l2_norm``, the reference's default) with a learned
  per-head temperature exp(min(scale_mul, log 100)), initialised at 4; without it the logits are
  scaled by 0.25 / sqrt(head_dim) as in the reference;
- initialisation: every linear and embedding is truncated normal with std sqrt(1 / (3 * dim)), the
  head's weight is then multiplied by ``init_head`` (0.02), the adaLN weights by ``init_adaln``
  (0.5) and the gate rows by ``init_adaln_gamma`` (1e-5), every adaLN bias is zero: the gates
  start at ~0, so each fresh block is the identity up to ~1e-5. The attention and MLP output
  projections are divided by sqrt(2 * depth).

Sampling (:func:`var_sample`) goes scale by scale: the logits of the current scale are guided,
filtered (top-k, top-p) and sampled, the tokenizer adds the scale to its latent and returns the
next scale's input, and ``decode_latent`` turns the final latent into images. Each step recomputes
the whole prefix instead of keeping a KV cache: with the block-causal mask the logits are the same,
and the sequence is short at the sizes vitkit trains.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import Attention, DropPath, Mlp
from .registry import register_generator


def block_causal_mask(scales) -> Tensor:
    """(L, L) bool, L = sum(s*s): True where token i may attend to token j, i.e. j's scale is i's or coarser."""
    level = torch.repeat_interleave(torch.arange(len(scales)), torch.tensor([s * s for s in scales]))  # (L,)
    return level[:, None] >= level[None, :]


class VARAttention(Attention):
    """VAR's self-attention: a query and a value bias but none on the keys, and optionally L2-normalised
    queries and keys with a learned per-head temperature (the temperature is folded into q, so the fused
    kernel runs with scale 1); without it the logits are scaled by 0.25 / sqrt(head_dim)."""

    def __init__(self, dim: int, num_heads: int, attn_l2_norm: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qkv_bias=False, attn_drop=attn_drop, proj_drop=proj_drop)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
            self.scale_mul = None

    def project(self, x: Tensor, rope=None, num_prefix_tokens: int = 0) -> tuple[Tensor, ...]:
        """(B, N, C) -> q, k, v, each (B, heads, N, head_dim), with VAR's biases and normalisation."""
        B, N, C = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        if self.scale_mul is not None:
            q = F.normalize(q, dim=-1) * self.scale_mul.clamp(max=math.log(100.0)).exp()
            k = F.normalize(k, dim=-1)
        return q, k, v

    def mix(self, q: Tensor, k: Tensor, v: Tensor, attn_bias: Tensor | None) -> Tensor:
        return self.attend(q, k, v, attn_bias, scale=self.scale)


class AdaLNModulation(nn.Module):
    """adaLN: SiLU + Linear from the condition (B, D) to the six vectors (B, 1, 6, C) of a block (or of all, shared),
    in the order gamma1, gamma2, scale1, scale2, shift1, shift2."""

    def __init__(self, cond_dim: int, dim: int):
        super().__init__()
        self.dim = dim
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, cond: Tensor) -> Tensor:
        return self.ada_lin(cond).view(-1, 1, 6, self.dim)  # (B, 1, 6, C)


class SharedAdaLNOffset(nn.Module):
    """The shared-adaLN variant: the model computes (B, 1, 6, C) once for all blocks; each block adds its
    learned offset ``ada_gss``."""

    def __init__(self, dim: int):
        super().__init__()
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim**0.5)

    def forward(self, shared: Tensor) -> Tensor:
        return self.ada_gss + shared  # (B, 1, 6, C)


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block conditioned by adaLN with gates:

    x = x + drop_path(gamma1 * attn(LN(x) * (1 + scale1) + shift1))
    x = x + drop_path(gamma2 * mlp(LN(x) * (1 + scale2) + shift2))
    """

    def __init__(self, dim: int, cond_dim: int, num_heads: int, mlp_ratio: float = 4.0, shared_aln: bool = False,
                 attn_l2_norm: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.attn = VARAttention(dim, num_heads, attn_l2_norm, attn_drop, drop)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ada = SharedAdaLNOffset(dim) if shared_aln else AdaLNModulation(cond_dim, dim)

    def forward(self, x: Tensor, cond: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        """x: (B, N, C); cond: (B, D), or (B, 1, 6, C) from the shared linear; attn_bias additive (N, N)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada(cond).unbind(2)  # each (B, 1, C)
        x = x + self.drop_path(self.attn(self.norm(x) * (1 + scale1) + shift1, attn_bias=attn_bias) * gamma1)
        return x + self.drop_path(self.mlp(self.norm(x) * (1 + scale2) + shift2) * gamma2)


class AdaLNHeadNorm(nn.Module):
    """LayerNorm (no affine) modulated by (1 + scale, shift) from the condition, before the head."""

    def __init__(self, dim: int, cond_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.dim).unbind(2)  # each (B, 1, C)
        return self.norm(x) * (1 + scale) + shift


class VAR(nn.Module):
    """Class-conditional next-scale prediction over a multi-scale tokenizer's token maps.

    ``forward(labels, x_input) -> logits (B, L', codebook_size)``: ``labels`` (B,) in
    [0, num_classes] (``num_classes`` is the null class), ``x_input`` (B, L' - 1, embed_dim) the
    teacher-forcing inputs of scales 2.. (the tokenizer's ``scales_to_var_input``). ``L'`` is
    ``L = sum(s*s)``, or the length of a prefix of whole scales (what sampling feeds).

    Args:
        codebook_size, embed_dim, scales: the tokenizer's vocabulary, code width and scale sides.
        num_classes: classes; the class embedding has one more row, the null class.
        dim, depth, num_heads, mlp_ratio: the transformer; the defaults are the reference's
            smallest model, VAR-d16 (it ties dim = 64 * depth, heads = depth); the registered
            CPU variants ``var_test`` and ``var_nano`` are smaller.
        drop_rate, attn_drop_rate: dropout of the branch outputs and of the attention weights
            (0 as in the reference).
        drop_path_rate: stochastic depth of the last block, linear from 0; None is the
            reference's rule 0.1 * depth / 24.
        shared_aln: one adaLN linear shared by the blocks (the reference's option; off by default as there).
        attn_l2_norm: L2-normalised attention with a learned temperature (on by default as there).
        init_std: std of the truncated-normal init of linears and embeddings; None = sqrt(1 / (3 dim)).
        init_head, init_adaln, init_adaln_gamma: the reference's init multipliers (0.02, 0.5, 1e-5).
    """

    kind = "var"

    def __init__(self, codebook_size: int, embed_dim: int, scales, num_classes: int, dim: int = 1024,
                 depth: int = 16, num_heads: int = 16, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float | None = None, norm_eps: float = 1e-6,
                 shared_aln: bool = False, attn_l2_norm: bool = True, init_std: float | None = None,
                 init_head: float = 0.02, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5):
        super().__init__()
        scales = tuple(int(s) for s in (scales or ()))
        if not scales or any(s < 1 for s in scales) or any(a >= b for a, b in zip(scales, scales[1:])):
            raise ConfigError(f"VAR needs the tokenizer's scales, increasing sides >= 1, e.g. (1, 2, 3, 4, 5, 7); got {scales}")
        if num_classes < 1:
            raise ConfigError(f"VAR is class-conditional: num_classes must be >= 1, got {num_classes}")
        self.codebook_size, self.embed_dim, self.scales = int(codebook_size), int(embed_dim), scales
        self.num_classes, self.dim, self.depth = int(num_classes), int(dim), int(depth)
        self.first_l = scales[0] ** 2
        self.ends = [sum(s * s for s in scales[: k + 1]) for k in range(len(scales))]  # cumulative lengths
        self.L = self.ends[-1]

        self.word_embed = nn.Linear(self.embed_dim, dim)
        self.class_emb = nn.Embedding(num_classes + 1, dim)
        std = math.sqrt(1 / dim / 3)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, self.L, dim))  # absolute position of each token of each scale
        self.lvl_embed = nn.Embedding(len(scales), dim)
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_embed, std=std)

        self.shared_ada_lin = AdaLNModulation(dim, dim) if shared_aln else nn.Identity()  # one for every block
        dpr_max = 0.1 * depth / 24 if drop_path_rate is None else drop_path_rate
        dpr = torch.linspace(0, dpr_max, depth).tolist()
        self.blocks = nn.ModuleList([
            AdaLNBlock(dim, dim, num_heads, mlp_ratio, shared_aln, attn_l2_norm, drop_rate, attn_drop_rate, dpr[i],
                       norm_eps)
            for i in range(depth)
        ])
        self.head_nm = AdaLNHeadNorm(dim, dim, norm_eps)
        self.head = nn.Linear(dim, self.codebook_size)

        level = torch.repeat_interleave(torch.arange(len(scales)), torch.tensor([s * s for s in scales]))
        self.register_buffer("level", level[None], persistent=False)  # (1, L): each token's scale
        bias = torch.zeros(self.L, self.L).masked_fill_(~block_causal_mask(scales), float("-inf"))
        self.register_buffer("attn_bias", bias, persistent=False)  # (L, L) additive
        self._init_weights(std if init_std is None else init_std, init_head, init_adaln, init_adaln_gamma)

    @torch.no_grad()
    def _init_weights(self, std: float, init_head: float, init_adaln: float, init_adaln_gamma: float) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        self.head.weight.mul_(init_head)
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        C = self.dim
        for blk in self.blocks:
            # Dividing the residual branches' output projections keeps the stream's variance bounded in depth.
            blk.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            blk.mlp.fc2.weight.div_(math.sqrt(2 * self.depth))
            if isinstance(blk.ada, AdaLNModulation):
                w = blk.ada.ada_lin[-1].weight  # (6C, D): rows gamma1, gamma2, then scales and shifts
                w[2 * C:].mul_(init_adaln)
                w[: 2 * C].mul_(init_adaln_gamma)
            else:
                blk.ada.ada_gss[:, :, 2:].mul_(init_adaln)
                blk.ada.ada_gss[:, :, :2].mul_(init_adaln_gamma)

    def no_weight_decay(self) -> set[str]:
        """Position, level and start embeddings, attention temperatures and shared-adaLN offsets (the reference's list)."""
        keys = ("pos_start", "pos_embed", "lvl_embed", "scale_mul", "ada_gss")
        return {n for n, _ in self.named_parameters() if any(k in n for k in keys)}

    def forward(self, labels: Tensor, x_input: Tensor) -> Tensor:
        """labels (B,), x_input (B, L' - first_l, embed_dim) -> logits (B, L', codebook_size)."""
        B = labels.shape[0]
        if x_input.ndim != 3 or x_input.shape[0] != B or x_input.shape[2] != self.embed_dim:
            raise ValueError(
                f"VAR expects x_input of shape (B={B}, tokens, embed_dim={self.embed_dim}) from the tokenizer's "
                f"scales_to_var_input; got {tuple(x_input.shape)}"
            )
        end = self.first_l + x_input.shape[1]
        if end not in self.ends:
            raise ValueError(
                f"x_input holds {x_input.shape[1]} tokens, not the inputs of whole scales {self.scales[1:]}: "
                f"expected one of {[e - self.first_l for e in self.ends]}"
            )
        cond = self.class_emb(labels)  # (B, D)
        sos = cond[:, None].expand(B, self.first_l, -1) + self.pos_start  # (B, first_l, D)
        x = torch.cat([sos, self.word_embed(x_input.to(sos.dtype))], dim=1)  # (B, L', D)
        x = x + self.lvl_embed(self.level[:, :end]) + self.pos_embed[:, :end]
        shared = self.shared_ada_lin(cond)
        bias = self.attn_bias[:end, :end]
        for blk in self.blocks:
            x = blk(x, shared, bias)
        return self.head(self.head_nm(x, cond))  # (B, L', V)


def guidance_scale(guidance: float, k: int, num_scales: int, schedule: str = "linear") -> float:
    """The guidance of scale ``k`` (0-based) in the convention ``u + g * (c - u)``.

    ``"linear"`` is VAR's schedule: the reference mixes ``(1 + t) * c - t * u`` with
    ``t = cfg * k / (K - 1)``, i.e. g = 1 + (guidance - 1) * k / (K - 1): plain conditional at the
    first scale, the full ``guidance`` at the last (the reference's ``cfg`` is ``guidance - 1``).
    ``"constant"`` uses ``guidance`` at every scale.
    """
    if schedule == "constant":
        return float(guidance)
    if schedule != "linear":
        raise ConfigError(f"unknown VAR guidance schedule {schedule!r}: use 'linear' (VAR's) or 'constant'")
    return 1.0 + (guidance - 1.0) * k / max(num_scales - 1, 1)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """Logits (..., V) with every token outside the top ``k`` and outside the smallest set of most probable
    tokens whose mass reaches ``top_p`` set to -inf (0 turns either filter off; the most probable token always stays)."""
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1) the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more probable tokens
        drop_sorted = mass_before >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def _check_pair(model: VAR, tokenizer: nn.Module) -> None:
    scales = getattr(tokenizer, "scales", None)
    if not scales:
        raise ConfigError(
            "VAR needs a multi-scale tokenizer (VQTokenizer(quantizer='multiscale'), e.g. msvq_nano); "
            "this one quantises a single scale"
        )
    mine = (model.scales, model.codebook_size, model.embed_dim)
    theirs = (tuple(scales), tokenizer.codebook_size, tokenizer.embed_dim)
    if mine != theirs:
        raise ConfigError(
            f"this VAR was built for scales {mine[0]}, codebook {mine[1]}, embed_dim {mine[2]} but the tokenizer has "
            f"scales {theirs[0]}, codebook {theirs[1]}, embed_dim {theirs[2]}: build VAR from the tokenizer it was trained with"
        )


@torch.no_grad()
def var_sample(model: VAR, tokenizer: nn.Module, labels: Tensor, *, top_k: int = 0, top_p: float = 0.0,
               temperature: float = 1.0, guidance: float = 2.5, guidance_schedule: str = "linear",
               generator: torch.Generator | None = None) -> Tensor:
    """Class-conditional images (B, C, H, W) in [-1, 1], one scale per step (``len(model.scales)`` steps).

    At scale k the logits of the conditional (``labels``) and unconditional (null class) passes are
    mixed as ``u + g_k * (c - u)`` (:func:`guidance_scale`; ``guidance=1`` skips the null pass),
    divided by ``temperature``, filtered by ``top_k`` / ``top_p`` (:func:`filter_logits`) and every
    token of the scale is sampled at once with ``generator``. The defaults are those of the
    reference's ``autoregressive_infer_cfg`` (cfg 1.5, i.e. guidance 2.5 on the linear schedule, no
    filtering); its FID runs used top_k=900 (of 4096 codes) and top_p=0.96.
    """
    _check_pair(model, tokenizer)
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    labels = labels.reshape(-1).long()
    if labels.numel() and (labels.min() < 0 or labels.max() > model.num_classes):
        raise ConfigError(
            f"class ids must lie in [0, {model.num_classes}] ({model.num_classes} = no class); got "
            f"{labels.min().item()}..{labels.max().item()}"
        )
    device = next(model.parameters()).device
    labels = labels.to(device)
    B, K = labels.shape[0], len(model.scales)
    guided = any(guidance_scale(guidance, k, K, guidance_schedule) != 1.0 for k in range(K))
    cond_labels = torch.cat([labels, torch.full_like(labels, model.num_classes)]) if guided else labels
    grid = model.scales[-1]
    f_hat = torch.zeros(B, model.embed_dim, grid, grid, device=device)
    inputs: list[Tensor] = []  # teacher-forcing inputs of the scales sampled so far, each (B, s*s, embed_dim)
    was_training = model.training
    model.eval()
    try:
        for k, s in enumerate(model.scales):
            x_in = torch.cat(inputs, dim=1) if inputs else f_hat.new_zeros(B, 0, model.embed_dim)  # (B, L'-first_l, Cvae)
            if guided:
                x_in = torch.cat([x_in, x_in])  # (2B, ...): conditional then unconditional
            logits = model(cond_labels, x_in)[:, -s * s:].float()  # (B or 2B, s*s, V)
            if guided:
                c, u = logits[:B], logits[B:]
                logits = u + guidance_scale(guidance, k, K, guidance_schedule) * (c - u)
            logits = filter_logits(logits / temperature, top_k, top_p)
            probs = logits.softmax(-1).reshape(B * s * s, -1)  # (B*s*s, V)
            idx = torch.multinomial(probs, 1, generator=generator).view(B, s, s)
            f_hat, nxt = tokenizer.var_next_input(k, f_hat, idx)
            if nxt is not None:
                inputs.append(nxt)
        return tokenizer.decode_latent(f_hat).clamp(-1, 1)
    finally:
        model.train(was_training)


register_generator("var_test", "var", VAR, dict(
    codebook_size=512, embed_dim=32, scales=(1, 2, 3, 4, 5, 7), num_classes=10, dim=32, depth=2, num_heads=2,
))
# The CPU benchmark size (the reference's smallest, depth 16, is dim 1024 with 16 heads).
register_generator("var_nano", "var", VAR, dict(
    codebook_size=512, embed_dim=32, scales=(1, 2, 3, 4, 5, 7), num_classes=10, dim=192, depth=6, num_heads=6,
))

__all__ = ["VAR", "AdaLNBlock", "VARAttention", "block_causal_mask", "filter_logits", "guidance_scale", "var_sample"]
