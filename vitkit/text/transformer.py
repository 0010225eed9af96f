"""The text tower of CLIP-style two-tower models: token + position embeddings, pre-norm blocks, a pooled projection."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.act import get_act_layer
from ..layers.block import Block

POOLS = ("argmax", "eot", "last", "first")


class TextTransformer(nn.Module):
    """A transformer over token ids that returns one embedding per text.

    OpenAI CLIP's text tower by default: learned positions, causal self-attention, pre-norm
    blocks, a final LayerNorm, and the feature at the end-of-text token projected to
    ``output_dim``. The pooled position is chosen by ``pool``:

    - ``"argmax"``: the position of the largest token id (CLIP's BPE gives its end-of-text
      token the largest id, so this is where the text ends);
    - ``"eot"``: the first position holding ``eot_id`` (tokenizers whose end token is not the
      largest id, e.g. one trained on your captions);
    - ``"last"``: the last position (SigLIP, whose texts are padded to the full length with the
      end token and attend without a causal mask);
    - ``"first"``: the first position.

    ``pad_mask=True`` hides padding (``pad_id``) from attention; it needs ``causal=False`` (with a
    causal mask padding already comes after the pooled token) and is off by default as in
    CLIP and SigLIP, which attend over the padding.

    ``forward(tokens)`` takes (B, L) int64 ids with L <= ``context_length`` and returns the
    unnormalised (B, output_dim) embedding; ``forward_tokens(tokens)`` returns every position's
    (B, L, width) feature after the final norm.
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        output_dim: int = 512,
        act_layer: str = "gelu",
        norm_eps: float = 1e-5,
        causal: bool = True,
        pool: str = "argmax",
        eot_id: int | None = None,
        proj_bias: bool = False,
        pad_id: int = 0,
        qkv_bias: bool = True,
        pad_mask: bool = False,
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown text pool {pool!r}; choose one of {', '.join(POOLS)}")
        if pool == "eot" and eot_id is None:
            raise ValueError("pool='eot' needs eot_id, the tokenizer's end-of-text id")
        if pad_mask and causal:
            raise ValueError("pad_mask=True needs causal=False: under a causal mask padding never reaches the text")
        for name, value in (("vocab_size", vocab_size), ("context_length", context_length), ("width", width),
                            ("depth", depth), ("output_dim", output_dim)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if width % num_heads:
            raise ValueError(f"text width {width} is not divisible by num_heads {num_heads}")
        self.model_args = {
            "vocab_size": vocab_size, "context_length": context_length, "width": width, "depth": depth,
            "num_heads": num_heads, "mlp_ratio": mlp_ratio, "output_dim": output_dim, "act_layer": act_layer,
            "norm_eps": norm_eps, "causal": causal, "pool": pool, "eot_id": eot_id, "proj_bias": proj_bias,
            "pad_id": pad_id, "qkv_bias": qkv_bias, "pad_mask": pad_mask,
        }
        self.vocab_size, self.context_length, self.width, self.output_dim = vocab_size, context_length, width, output_dim
        self.num_heads, self.causal, self.pool = num_heads, causal, pool
        self.eot_id, self.pad_id, self.pad_mask = eot_id, pad_id, pad_mask
        self.grad_checkpointing = False

        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, qkv_bias=qkv_bias, act_layer=get_act_layer(act_layer),
                  norm_layer=norm_layer)
            for _ in range(depth)
        )
        self.norm = norm_layer(width)
        self.proj = nn.Linear(width, output_dim, bias=proj_bias)
        if causal:
            # -inf above the diagonal: position i attends to positions <= i only.
            mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
            self.register_buffer("causal_mask", mask, persistent=False)
        else:
            self.causal_mask = None
        self.init_weights()

    def init_weights(self) -> None:
        """open_clip's text-tower initialisation (the OpenAI CLIP scheme): scaled normals by width and depth."""
        depth = max(len(self.blocks), 1)
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * depth) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            # torch's MultiheadAttention, which CLIP's reference uses, starts its biases at zero.
            for bias in (block.attn.qkv.bias, block.attn.proj.bias):
                if bias is not None:
                    nn.init.zeros_(bias)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
        nn.init.normal_(self.proj.weight, std=attn_std)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def no_weight_decay(self) -> set[str]:
        return {"positional_embedding"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _check(self, tokens: torch.Tensor) -> None:
        if tokens.ndim != 2:
            raise ValueError(f"text tokens must be (batch, length) ids, got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"text tokens must be integer ids, got {tokens.dtype}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(
                f"text of {tokens.shape[1]} tokens is longer than the text tower's context_length "
                f"{self.context_length}; tokenize with context_length={self.context_length}"
            )
        if not torch.compiler.is_compiling() and tokens.numel():
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"token id {high if high >= self.vocab_size else low} is outside the text tower's vocabulary "
                    f"of {self.vocab_size}; use the tokenizer the model was built with"
                )

    def attn_bias(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The additive attention bias for these tokens: (L, L) causal, (B, 1, 1, L) padding, or None."""
        L = tokens.shape[1]
        if self.causal_mask is not None:
            return self.causal_mask[:L, :L]
        if self.pad_mask:
            bias = torch.zeros(tokens.shape, dtype=self.positional_embedding.dtype, device=tokens.device)
            return bias.masked_fill_(tokens == self.pad_id, float("-inf"))[:, None, None, :]  # (B, 1, 1, L)
        return None

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, width) features after the final norm."""
        self._check(tokens)
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:L]
        bias = self.attn_bias(tokens)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, None, 0, bias, use_reentrant=False)
            else:
                x = block(x, attn_bias=bias)
        return self.norm(x)

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B,) the position each text is pooled from."""
        B, L = tokens.shape
        if self.pool == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool == "eot":
            # argmax of a 0/1 mask is its first 1; a text without the end token falls back to position 0.
            return (tokens == self.eot_id).int().argmax(dim=-1)
        if self.pool == "last":
            return torch.full((B,), L - 1, dtype=torch.long, device=tokens.device)
        return torch.zeros(B, dtype=torch.long, device=tokens.device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, output_dim) text embedding (not normalised)."""
        x = self.forward_tokens(tokens)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.pool_index(tokens)]
        return self.proj(pooled)
