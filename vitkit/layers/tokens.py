"""What travels with a token sequence between ``embed`` and the blocks: grid, positions, sizes, bias."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


def proportional_bias(sizes: torch.Tensor) -> torch.Tensor:
    """(B, N) token sizes -> (B, 1, 1, N) additive attention bias log(size): attention weighs key j
    as if it were sizes[j] copies of one token (ToMe's proportional attention)."""
    return sizes.log()[:, None, None, :]


@dataclass
class TokenContext:
    """Side information for a ``(B, prefix + L, D)`` token sequence.

    Prefix tokens (class, distillation, registers) come first and are never dropped or moved.
    The L patch tokens may be any subset of the grid in any order; their ``positions`` say where
    each came from, so RoPE and the mask token's position embedding follow the tokens.

    grid: the (H', W') patch grid of the image.
    num_prefix_tokens: tokens before the patches.
    positions: (1 or B, L) long, flat row-major grid index of each patch token.
    pos_embed: (1 or B, L, D) additive position embedding of each patch token (what a mask token
        gets at that place), or None when the model has none.
    sizes: (1 or B, prefix + L) how many original tokens each token stands for (merged tokens);
        None means all 1. Attention weighs key j by sizes[j] (proportional attention).
    attn_bias: additive attention bias broadcastable to (B, heads, prefix + L, prefix + L), or None.
    """

    grid: tuple[int, int]
    num_prefix_tokens: int
    positions: torch.Tensor
    pos_embed: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    attn_bias: torch.Tensor | None = None

    @property
    def num_patches(self) -> int:
        """Patch tokens in the sequence now (H' * W' before any selection)."""
        return self.positions.shape[1]

    def attention_bias(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The bias every block adds to its attention logits: ``attn_bias`` + log(sizes) over keys.

        None when there is neither, so attention runs unmasked (on GPUs a mask, even of zeros,
        rules out the flash kernel).
        """
        bias = self.attn_bias
        if self.sizes is not None:
            log_sizes = proportional_bias(self.sizes)
            bias = log_sizes if bias is None else bias + log_sizes
        return bias if bias is None or dtype is None else bias.to(dtype)

    def select(self, tokens: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, TokenContext]:
        """Keep the prefix tokens and the patch tokens at ``keep`` (B, K) indices, in that order.

        Indices count patch tokens of the current sequence (0 .. L-1). Returns the
        (B, prefix + K, D) tokens and a context whose positions, position embeddings, sizes and
        attention bias follow the kept tokens.
        """
        B, N, D = tokens.shape
        npt = self.num_prefix_tokens
        if keep.ndim != 2 or keep.shape[0] != B or keep.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"keep must be (B={B}, K) integer indices, got {keep.dtype} {tuple(keep.shape)}")
        # The range check reads values back to the host: only where that costs no device sync (an
        # accelerator's gather asserts on a bad index by itself).
        if keep.device.type == "cpu" and keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= N - npt):
            raise ValueError(f"keep indices must lie in [0, {N - npt}) (the patch tokens), got {keep.min()}..{keep.max()}")
        keep = keep.long()
        patches = tokens[:, npt:].gather(1, keep[..., None].expand(-1, -1, D))  # (B, K, D)
        out = torch.cat([tokens[:, :npt], patches], dim=1)
        # Sequence indices of the kept tokens, prefix included: (B, prefix + K).
        seq = torch.cat([torch.arange(npt, device=keep.device).expand(B, -1), keep + npt], dim=1)
        pos_embed = None
        if self.pos_embed is not None:
            pos_embed = self.pos_embed.expand(B, -1, -1).gather(1, keep[..., None].expand(-1, -1, D))
        sizes = None if self.sizes is None else self.sizes.expand(B, -1).gather(1, seq)
        return out, replace(
            self,
            positions=self.positions.expand(B, -1).gather(1, keep),
            pos_embed=pos_embed,
            sizes=sizes,
            attn_bias=None if self.attn_bias is None else _select_bias(self.attn_bias, seq),
        )


def _select_bias(bias: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """Rows and columns ``seq`` (B, M) of a bias broadcastable to (B, heads, N, N)."""
    B, M = seq.shape
    bias = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape)).expand(B, -1, -1, -1)
    H, R, C = bias.shape[1:]
    if R > 1:
        bias = bias.gather(2, seq[:, None, :, None].expand(-1, H, -1, C))  # (B, heads, M, C)
    if C > 1:
        bias = bias.gather(3, seq[:, None, None, :].expand(-1, H, bias.shape[2], -1))  # (B, heads, M|1, M)
    return bias
