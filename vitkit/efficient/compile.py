"""``torch.compile`` as an inference path, falling back to eager with a clear message where it fails."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Compiled:
    """What :func:`compile_for_inference` produced: the model to call, and whether it is compiled."""

    model: nn.Module
    compiled: bool
    reason: str = ""


def compile_for_inference(
    model: nn.Module, example: torch.Tensor, mode: str | None = None, verbose: bool = True
) -> Compiled:
    """Compile ``model`` and run it once on ``example`` (compilation is lazy, so failures show there).

    Where compilation fails (no C++ compiler for the CPU backend, an unsupported op, an old GPU),
    the eager model comes back with the reason, printed to stderr when ``verbose``; the outputs
    are the same either way, only slower.
    """
    model.eval()
    try:
        compiled = torch.compile(model, mode=mode)
        with torch.inference_mode():
            compiled(example)
    except Exception as e:  # noqa: BLE001 - any backend failure means: run eager
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        reason = f"{type(e).__name__}: {first}"
        if verbose:
            print(f"vitkit: torch.compile failed, running eager instead ({reason})", file=sys.stderr)
        torch._dynamo.reset()
        return Compiled(model, False, reason)
    return Compiled(compiled, True)
