"""Load any ViT checkpoint into a vitkit model: read, unwrap, detect the layout, convert, adapt, load.

``load_weights`` reads the source through :mod:`vitkit.weights_io` (file, folder, state dict or
hub repo), unwraps training wrappers, detects the layout by its keys, renames with one pure
converter per layout, fits the result to the model (``adapt.py``: grids, patch size, channels,
heads) and loads with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import WeightsError
from ..weights_io import first_keys, read_state_dict, unwrap
from .adapt import adapt_to_model
from .dinov2 import convert_dinov2, is_dinov2
from .hf import convert_hf, is_hf
from .mae import convert_mae, is_mae
from .timm import convert_timm, is_timm
from .vim import convert_vim, is_vim

# Checked in order: the HF, MAE/DINOv2 and Vim layouts are more specific than plain timm keys
# (a Vim checkpoint's ``layers.N`` blocks would pass for Swin's).
FORMATS: dict[str, tuple[Callable, Callable]] = {
    "hf": (is_hf, convert_hf),
    "mae": (is_mae, convert_mae),
    "dinov2": (is_dinov2, convert_dinov2),
    "vim": (is_vim, convert_vim),
    "timm": (is_timm, convert_timm),
}


@dataclass
class LoadReport:
    """What ``load_weights`` did: the detected format and everything that was not a plain copy."""

    format: str
    source: str
    resampled: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.source} (format: {self.format})"]
        lines += [f"  resampled: {r}" for r in self.resampled]
        lines += [f"  {d}" for d in self.dropped]
        lines += [f"  note: {n}" for n in self.notes]
        if self.missing:
            lines.append(f"  missing (left at init): {first_keys(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (ignored): {first_keys(self.unexpected)}")
        return "\n".join(lines)


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The name of the first layout in ``FORMATS`` whose key test matches."""
    for name, (test, _) in FORMATS.items():
        if test(state_dict):
            return name
    raise WeightsError(
        f"unknown checkpoint format; first keys: {first_keys(list(state_dict), 8)}. Supported: timm/DeiT ViT, "
        "HF transformers ViT/DeiT/DINOv2, official DINOv2 and MAE. Rename the keys to timm's ViT names "
        "(patch_embed.proj, blocks.N.attn.qkv, ...) and pass the state dict"
    )


# ---------------------------------------------------------------------- loading
def load_weights(model: nn.Module, source, *, strict: bool = True, verbose: bool = True) -> LoadReport:
    """Load a checkpoint into ``model``, converting and resampling as needed.

    Args:
        model: a vitkit model (its ``state_dict`` names are timm's).
        source: a ``.safetensors`` or ``.pth/.pt/.bin`` file, a state dict (possibly wrapped as
            ``{"model": ...}``), a Hugging Face style folder, or a hub repo id resolved through
            the local hub cache (``HF_HUB_OFFLINE=1`` works once the files are cached).
        strict: raise a ValueError when keys or shapes still differ after conversion; with
            False, those tensors keep their initialisation and are listed in the report.
        verbose: print the report.
    Returns:
        a ``LoadReport``.
    """
    raw, where = read_state_dict(source)
    notes: list[str] = []
    sd = unwrap(raw, notes)
    fmt = detect_format(sd)
    try:
        sd = FORMATS[fmt][1](sd, notes)
        sd, log = adapt_to_model(sd, model)
    except ValueError as e:  # the converters and adapters name what does not fit; say which checkpoint
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(
            f"checkpoint {where} (detected format: {fmt}) cannot be fitted to {type(model).__name__}: {e}"
        ) from e
    target = model.state_dict()
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    mismatched = [k for k in sorted(set(sd) & set(target)) if sd[k].shape != target[k].shape]
    if strict and (missing or unexpected or mismatched):
        problems = []
        if missing:
            problems.append(f"missing from the checkpoint: {first_keys(missing)}")
        if unexpected:
            problems.append(f"not in the model: {first_keys(unexpected)}")
        if mismatched:
            shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}" for k in mismatched]
            problems.append(f"shape mismatch: {first_keys(shapes)}")
        raise WeightsError(
            f"checkpoint {where} (detected format: {fmt}) does not fit {type(model).__name__}: "
            + "; ".join(problems)
            + ". Check that the model variant matches the checkpoint (depth, width, tokens), or pass strict=False"
        )
    for k in mismatched:
        sd.pop(k)
    model.load_state_dict(sd, strict=False)
    report = LoadReport(
        format=fmt, source=where, resampled=log.resampled, dropped=log.dropped, notes=notes + log.notes,
        missing=sorted(set(missing) | set(mismatched)), unexpected=unexpected,
    )
    if verbose:
        print(report)
    return report
