"""Selective state-space scan (Mamba's S6), in pure PyTorch.

For each channel d and state n the recurrence over positions t is

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        h_0 = 0
    y_t = sum_n C_t[n] * h_t[n] + D * u_t

with an input-dependent step ``delta`` (B, L, d), input matrices ``B`` and read-outs ``C``
(B, L, n) shared across channels, and a diagonal ``A`` (d, n) (negative: the state decays).

``selective_scan_ref`` runs the recurrence one position at a time, as written above.
``selective_scan`` computes the same numbers in chunks: inside a chunk a parallel prefix scan
(log2(chunk) vectorised steps instead of ``chunk`` sequential ones), across chunks the state is
carried. It only multiplies decays ``exp(delta * A)`` in (0, 1], as the loop does, so nothing
overflows (the closed form ``exp(cumsum) * cumsum(exp(-cumsum) * ...)`` does) and no precision
is lost to differences of large cumulative sums.
"""

from __future__ import annotations

import torch


def _check(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> None:
    if u.ndim != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, L, d), got {tuple(u.shape)} and {tuple(delta.shape)}")
    d, n = A.shape
    if u.shape[2] != d:
        raise ValueError(f"A is ({d}, {n}) but u has {u.shape[2]} channels")
    if B.shape != (u.shape[0], u.shape[1], n) or C.shape != B.shape:
        raise ValueError(f"B and C must be (batch, L, n)=({u.shape[0]}, {u.shape[1]}, {n}), got {tuple(B.shape)}, {tuple(C.shape)}")


def _inputs(u, delta, A, B):
    """Per-position decay exp(delta*A) and input delta*B*u, both (batch, L, d, n)."""
    decay = (delta[..., None] * A).exp()  # (batch, L, d, n), in (0, 1] for A <= 0
    drive = (delta * u)[..., None] * B[:, :, None, :]  # (batch, L, d, n)
    return decay, drive


def selective_scan_ref(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """The recurrence, one position at a time. u, delta: (batch, L, d); A: (d, n); B, C: (batch, L, n).

    Returns y (batch, L, d).
    """
    _check(u, delta, A, B, C)
    decay, drive = _inputs(u, delta, A, B)
    h = u.new_zeros(u.shape[0], *A.shape)  # (batch, d, n)
    ys = []
    for t in range(u.shape[1]):
        h = decay[:, t] * h + drive[:, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    y = torch.stack(ys, dim=1)  # (batch, L, d)
    return y if D is None else y + u * D


def selective_scan(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, chunk_size: int = 64,
) -> torch.Tensor:
    """Same result as :func:`selective_scan_ref`, computed chunk by chunk with a parallel prefix scan.

    Memory grows with ``chunk_size * log2(chunk_size)`` states per chunk kept for backward;
    the sequential work is ``L / chunk_size`` steps.
    """
    _check(u, delta, A, B, C)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    L = u.shape[1]
    h = u.new_zeros(u.shape[0], *A.shape)  # (batch, d, n): state entering the chunk
    ys = []
    for start in range(0, L, chunk_size):
        part = slice(start, start + chunk_size)
        # Built per chunk so that without autograd only one chunk of (batch, T, d, n) lives at a time.
        decay, acc = _inputs(u[:, part], delta[:, part], A, B[:, part])  # (batch, T, d, n) each
        T = acc.shape[1]
        # Hillis-Steele: after the step with offset k, acc_t sums the inputs of positions
        # t-2k+1..t, each decayed to t, and decay_t is the product of the decays over them.
        k = 1
        while k < T:
            acc = torch.cat([acc[:, :k], acc[:, k:] + decay[:, k:] * acc[:, :-k]], dim=1)
            decay = torch.cat([decay[:, :k], decay[:, k:] * decay[:, :-k]], dim=1)
            k *= 2
        states = acc + decay * h[:, None]  # (batch, T, d, n): h_t for every t in the chunk
        ys.append(torch.einsum("btdn,btn->btd", states, C[:, part]))
        h = states[:, -1]
    y = torch.cat(ys, dim=1)  # (batch, L, d)
    return y if D is None else y + u * D
