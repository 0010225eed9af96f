"""MaskGIT (Chang et al. 2022): a bidirectional transformer that fills a grid of VQ tokens in parallel.

Training masks a share ``cosine_schedule(r)`` (r ~ U(0, 1)) of an image's tokens and predicts
them all at once (:mod:`vitkit.objectives.maskgit`). Sampling (:func:`maskgit_sample`) starts
from a fully masked grid and, over ``steps`` rounds, samples every masked token, keeps the most
confident ones and masks the rest again, fewer each round along the same cosine schedule.

The network follows the reference (google-research/maskgit, a BERT): token and learned position
embeddings, LayerNorm and dropout, post-norm blocks (LayerNorm eps 1e-12, tanh GELU), and the MLM
head dense -> GELU -> LayerNorm -> logits tied to the token embedding plus a bias. The class is a
prefix token: ``num_classes + 1`` class embeddings, the last (id ``num_classes``) being the null
class of classifier-free guidance. The mask token is id ``codebook_size`` of the token embedding.

Classifier-free guidance acts on the logits: ``u + g * (c - u)`` with ``c`` the conditional and
``u`` the null-class logits, so ``g = 1`` is plain conditional sampling and ``g = 0``
unconditional. The reference has no guidance; its sampler is ``g = 1``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from ..layers import Block
from .registry import register_generator

# BERT's LayerNorm epsilon and GELU (jax.nn.gelu is the tanh approximation), as the reference.
_BertNorm = partial(nn.LayerNorm, eps=1e-12)
_BertGELU = partial(nn.GELU, approximate="tanh")


def cosine_schedule(r: Tensor | float) -> Tensor | float:
    """MaskGIT's mask ratio for progress ``r`` in [0, 1]: ``cos(pi/2 * r)`` (1 at r=0, 0 at r=1).

    A float gives a float (computed in double precision, so token counts are exact), a tensor a tensor.
    """
    if isinstance(r, Tensor):
        return torch.cos(r * (math.pi / 2))
    return math.cos(float(r) * math.pi / 2)


class MaskGIT(nn.Module):
    """Class-conditional masked token transformer over a ``grid x grid`` map of ``codebook_size`` codes.

    Args:
        codebook_size: codes of the tokenizer; id ``codebook_size`` is the mask token (``mask_id``).
        grid: side of the token map (the tokenizer's ``grid``); the sequence is ``grid**2`` tokens
            after one class token.
        num_classes: real classes; id ``num_classes`` is the null class (classifier-free guidance).
        dim, depth, num_heads, mlp_ratio: the transformer (reference: 768, 24, 16, 4).
        dropout: hidden and attention dropout (reference: 0.1).
        post_norm: BERT's post-norm blocks as the reference (True), or pre-norm blocks with a
            final LayerNorm.
        init_std: the truncated-normal (at two standard deviations) init of every weight and
            embedding (reference: 0.02); biases start at zero.

    ``forward(tokens (B, L) or (B, grid, grid), labels (B,))`` returns logits (B, L, codebook_size).
    """

    kind = "maskgit"

    def __init__(self, codebook_size: int = 512, grid: int = 7, num_classes: int = 10, dim: int = 768,
                 depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0, dropout: float = 0.1,
                 post_norm: bool = True, init_std: float = 0.02):
        super().__init__()
        for name, v in (("codebook_size", codebook_size), ("grid", grid), ("num_classes", num_classes),
                        ("depth", depth)):
            if int(v) < 1:
                raise ConfigError(f"MaskGIT {name} must be >= 1, got {v}")
        if num_heads < 1 or dim % num_heads:
            raise ConfigError(f"MaskGIT dim {dim} must be divisible by num_heads {num_heads}: change model.args")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"MaskGIT dropout must be in [0, 1), got {dropout}")
        self.codebook_size, self.grid, self.num_classes = int(codebook_size), int(grid), int(num_classes)
        self.mask_id = self.codebook_size
        self.num_tokens = self.grid * self.grid
        self.dim = dim
        self.tok_embed = nn.Embedding(self.codebook_size + 1, dim)  # the codes, then the mask token
        self.class_embed = nn.Embedding(self.num_classes + 1, dim)  # the classes, then the null class
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_tokens, dim))  # class slot, then the grid
        self.embed_norm = _BertNorm(dim)
        self.embed_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, mlp_ratio, proj_drop=dropout, attn_drop=dropout, act_layer=_BertGELU,
                  norm_layer=_BertNorm, post_norm=post_norm)
            for _ in range(depth)
        ])
        # Post-norm blocks end normalised; pre-norm ones need the final norm.
        self.norm = nn.Identity() if post_norm else _BertNorm(dim)
        self.head_dense = nn.Linear(dim, dim)
        self.head_act = _BertGELU()
        self.head_norm = _BertNorm(dim)
        self.head_bias = nn.Parameter(torch.zeros(self.codebook_size))
        self._init_weights(init_std)

    def _init_weights(self, std: float) -> None:
        trunc = partial(nn.init.trunc_normal_, std=std, a=-2 * std, b=2 * std)
        trunc(self.pos_embed)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                trunc(m.weight)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """tokens: (B, L) or (B, grid, grid) code ids, ``mask_id`` where masked; labels: (B,) class ids,
        ``num_classes`` for none. Returns logits (B, L, codebook_size) at every grid position."""
        if tokens.ndim == 3:
            tokens = tokens.flatten(1)  # (B, L)
        if tokens.ndim != 2 or tokens.shape[1] != self.num_tokens:
            raise DataError(
                f"MaskGIT was built for a {self.grid}x{self.grid} token grid ({self.num_tokens} tokens) but got "
                f"tokens of shape {tuple(tokens.shape)}: encode images at the tokenizer's own size"
            )
        if labels.shape != tokens.shape[:1]:
            raise DataError(f"MaskGIT wants one class id per sequence: labels {tuple(labels.shape)} for "
                            f"{tokens.shape[0]} token sequences")
        x = torch.cat([self.class_embed(labels)[:, None], self.tok_embed(tokens)], dim=1)  # (B, 1 + L, D)
        x = self.embed_drop(self.embed_norm(x + self.pos_embed))
        for blk in self.blocks:
            x = blk(x)
        h = self.head_norm(self.head_act(self.head_dense(self.norm(x)[:, 1:])))  # (B, L, D): grid positions only
        # The reference's MLM head: logits against the code rows of the token embedding (not the mask row).
        return F.linear(h, self.tok_embed.weight[: self.codebook_size], self.head_bias)  # (B, L, K)


def guided_logits(model: nn.Module, tokens: Tensor, labels: Tensor, guidance: float = 1.0) -> Tensor:
    """The model's logits with classifier-free guidance ``u + guidance * (c - u)``, in float32.

    ``c`` is the output for ``labels``, ``u`` for the null class (``model.num_classes``). Both come
    from one forward pass over the batch stacked twice (2B sequences); ``guidance == 1`` runs the
    conditional batch only.
    """
    if guidance == 1.0:
        return model(tokens, labels).float()
    null = torch.full_like(labels, model.num_classes)
    both = model(torch.cat([tokens, tokens]), torch.cat([labels, null])).float()  # (2B, L, K)
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U[0, 1) draws from ``generator`` (on its own device) moved to ``device``."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _gumbel(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    u = _uniform(shape, generator, device).clamp_min(1e-20)  # log(0) would make an infinite draw
    return -torch.log(-torch.log(u))


def remask_count(step: int, steps: int, total: int, unknown: Tensor) -> Tensor:
    """How many tokens stay masked after decoding step ``step`` (0-based) of ``steps``: (B,).

    The reference's rule: ``floor(total * cosine_schedule((step + 1) / steps))``, at least one and at
    most ``unknown - 1`` (``unknown`` (B,): masked before the step), so each step fixes at least one
    token and leaves at least one for the next; none after the last step. When there are more steps
    than tokens the reference would re-mask a lone last token without fixing anything; here the
    one-fixed rule wins and the remaining steps fix nothing more.
    """
    if step == steps - 1:
        return torch.zeros_like(unknown)
    scheduled = math.floor(total * cosine_schedule((step + 1) / steps))
    return torch.minimum(unknown - 1, torch.full_like(unknown, max(1, scheduled))).clamp_min(0)


@torch.no_grad()
def maskgit_sample(model: nn.Module, labels: Tensor, *, steps: int = 8, temperature: float = 4.5,
                   guidance: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """MaskGIT's iterative parallel decoding: class ids (B,) -> code ids (B, grid, grid).

    At step s of S (from a fully masked grid of N tokens): one forward pass gives the (guided, see
    :func:`guided_logits`) logits; every masked token is sampled from them; its confidence is the
    log-probability of the sampled code plus Gumbel noise scaled by ``temperature * (1 - (s+1)/S)``
    (the reference's ``choice_temperature``, 4.5 in its class-conditional config); the
    :func:`remask_count` least confident new tokens are masked again. Tokens fixed in earlier steps
    stay fixed. The model runs exactly ``steps`` times (each call on 2B sequences with guidance).

    ``labels`` may hold ``model.num_classes`` (the null class) for unconditional samples. The model
    is put in eval mode for the call and restored after.
    """
    if steps < 1:
        raise ConfigError(f"MaskGIT sampling needs steps >= 1, got {steps}")
    if temperature < 0:
        raise ConfigError(f"MaskGIT sampling temperature must be >= 0, got {temperature}")
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.ndim != 1:
        raise ConfigError(f"MaskGIT sampling wants one class id per sample (B,), got shape {tuple(labels.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > model.num_classes):
        raise ConfigError(
            f"class ids must be in [0, {model.num_classes}) (or {model.num_classes} for unconditional samples), "
            f"got {sorted(set(labels.tolist()))}"
        )
    device = next(model.parameters()).device
    labels = labels.to(device)
    B, N, mask_id = len(labels), model.num_tokens, model.mask_id
    tokens = torch.full((B, N), mask_id, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        for s in range(steps):
            logits = guided_logits(model, tokens, labels, guidance)  # (B, N, K)
            unknown = tokens == mask_id  # (B, N)
            # Categorical sampling by the Gumbel-max trick, as jax.random.categorical.
            sampled = (logits + _gumbel(logits.shape, generator, device)).argmax(-1)  # (B, N)
            sampled = torch.where(unknown, sampled, tokens)
            logp = logits.log_softmax(-1).gather(-1, sampled[..., None]).squeeze(-1)  # (B, N)
            noise_scale = temperature * (1.0 - (s + 1) / steps)
            confidence = logp + noise_scale * _gumbel((B, N), generator, device) if noise_scale > 0 else logp
            # Fixed tokens are never masked again: infinite confidence sorts them last.
            confidence = torch.where(unknown, confidence, torch.full_like(confidence, math.inf))
            keep_masked = remask_count(s, steps, N, unknown.sum(1))  # (B,)
            rank = confidence.argsort(1).argsort(1)  # (B, N): 0 = least confident
            tokens = torch.where(rank < keep_masked[:, None], torch.full_like(sampled, mask_id), sampled)
    finally:
        model.train(was_training)
    return tokens.view(B, model.grid, model.grid)  # (B, grid, grid)


# Sizes for a CPU (the class defaults are the reference's ImageNet model). The run overrides
# codebook_size, grid and num_classes from the tokenizer and the data.
register_generator("maskgit_test", "maskgit", MaskGIT, dict(
    codebook_size=512, grid=7, num_classes=10, dim=32, depth=2, num_heads=2, dropout=0.0))
# No dropout: a 20-minute CPU run sees a few epochs, far from overfitting the masked-token task.
register_generator("maskgit_nano", "maskgit", MaskGIT, dict(
    codebook_size=512, grid=7, num_classes=10, dim=192, depth=6, num_heads=6, dropout=0.0))

__all__ = ["MaskGIT", "cosine_schedule", "guided_logits", "maskgit_sample", "remask_count"]
