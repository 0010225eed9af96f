"""Load any ViT checkpoint into a vitkit model, and save vitkit models as self-describing safetensors.

``load_weights`` reads the source (file, folder, state dict or hub repo), unwraps training
wrappers, detects the layout by its keys, renames with one pure converter per layout, fits the
result to the model (``adapt.py``: grids, patch size, channels, heads) and loads with
``strict=True``. Pickles are only read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, PathNotFoundError, WeightsError
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
# Training scripts nest the weights; the first key found wins (a DINO run's teacher is the model to use).
_WRAPPERS = ("state_dict", "model", "teacher", "student", "module", "net")
# DDP, torch.compile and self-supervised trainers prefix every key.
_PREFIXES = ("module.", "_orig_mod.", "backbone.")
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_HUB_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


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
            lines.append(f"  missing (left at init): {_first(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (ignored): {_first(self.unexpected)}")
        return "\n".join(lines)


def _first(keys: list[str], n: int = 10) -> str:
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ---------------------------------------------------------------------- reading sources
def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e).lower() and "unsupported global" not in str(e).lower():
            raise _corrupt(path, e) from None
        raise WeightsError(
            f"{path} holds Python objects that weights_only loading refuses (it would run arbitrary code): {e}. "
            "If you trust the file, load it yourself and pass the state dict, or re-save it as safetensors"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise _corrupt(path, e) from None


def _corrupt(path: Path, e: BaseException) -> WeightsError:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return WeightsError(
        f"cannot read weights file {path}: it is truncated or corrupt ({reason}). "
        "Download or copy it again (compare its size with the original), or point at another file"
    )


def _read_file(path: Path) -> dict:
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise _corrupt(path, e) from None
        sd = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(_read_file(path.parent / shard))
        return sd
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError or OSError
            raise _corrupt(path, e) from None
    if path.suffix in _PICKLE_SUFFIXES:
        return _torch_load(path)
    raise WeightsError(f"cannot read {path}: expected .safetensors, {'/'.join(_PICKLE_SUFFIXES)} or a folder")


def _read_folder(path: Path) -> dict:
    for name in _HUB_FILES:
        if (path / name).is_file():
            return _read_file(path / name)
    files = [p for p in sorted(path.iterdir()) if p.suffix in (".safetensors", *_PICKLE_SUFFIXES)]
    if len(files) == 1:
        return _read_file(files[0])
    found = ", ".join(p.name for p in files) or "no weight files"
    raise WeightsError(f"folder {path} has no {_HUB_FILES[0]} or {_HUB_FILES[2]} ({found}); pass the file to load")


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for the hub cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# File suffixes that mark a name as a local path even when it is shaped like ``owner/name``.
_FILE_SUFFIXES = (*_PICKLE_SUFFIXES, ".safetensors", ".json", ".npz", ".h5", ".onnx", ".yaml", ".yml")


def is_hub_id(source: str) -> bool:
    """Whether a name that is not a local file could be a hub repo id (``owner/name``, no file suffix)."""
    s = str(source)
    if s.startswith(("./", "../", "/", "~", ".\\")) or s.lower().endswith(_FILE_SUFFIXES):
        return False
    return bool(_REPO_ID.match(s.removeprefix("hf-hub:")))


def _download_hub(repo_id: str) -> Path:
    """Resolve a hub repo to a local weights file through the hub cache (works offline once cached)."""
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError
    except ImportError:
        if hub_offline():
            raise PathNotFoundError(
                f"no such file or folder: {repo_id!r} (HF_HUB_OFFLINE is set, so it is not looked up on the hub)"
            ) from None
        raise WeightsError(
            f"{repo_id!r} is not a local file or folder, and loading it from the Hugging Face hub needs "
            "huggingface_hub (pip install huggingface_hub); if you meant a local path, check the spelling"
        ) from None

    errors = []
    try:
        for name in _HUB_FILES:
            try:
                path = Path(hf_hub_download(repo_id, name))
            except EntryNotFoundError as e:
                errors.append(f"{name}: {type(e).__name__}")
                continue
            if name.endswith(".index.json"):
                for shard in sorted(set(json.loads(path.read_text())["weight_map"].values())):
                    hf_hub_download(repo_id, shard)
            return path
    except Exception as e:  # noqa: BLE001 - HTTP errors (requests or httpx), no network, cache misses, bad ids
        if constants.HF_HUB_OFFLINE:
            errors.append(f"{type(e).__name__}")
        else:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise WeightsError(
                f"cannot fetch weights for hub repo {repo_id!r}: {type(e).__name__}: {reason}. Check the id "
                "(https://huggingface.co/" + repo_id + "), your network, or set HF_HUB_OFFLINE=1 to use only "
                "the local cache; if you meant a local path, no such file or folder exists"
            ) from e
    if constants.HF_HUB_OFFLINE:
        raise PathNotFoundError(
            f"no such file or folder: {repo_id!r}, and no weights for it in the hub cache "
            f"{constants.HF_HUB_CACHE} (HF_HUB_OFFLINE is set: the files must already be in the cache); "
            "tried " + "; ".join(errors)
        )
    raise WeightsError(
        f"no weights found for hub repo {repo_id!r} (tried {'; '.join(errors)}): the repo has no "
        f"{' or '.join(_HUB_FILES[::2])}; check the id"
    )


def read_state_dict(source) -> tuple[dict, str]:
    """Any supported source -> (raw checkpoint object, description of where it came from)."""
    if isinstance(source, Mapping):
        return dict(source), "state dict"
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"source must be a path, a hub repo id or a state dict, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path), str(path)
    if path.is_dir():
        return _read_folder(path), str(path)
    repo_id = str(source).removeprefix("hf-hub:")
    if is_hub_id(str(source)):
        return _read_file(_download_hub(repo_id)), f"hub:{repo_id}"
    raise PathNotFoundError(
        f"no such file or folder: {str(source)!r} (it is neither an existing file or folder nor a hub repo id "
        "'owner/name'); check the path"
    )


def unwrap(obj: dict, notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Strip training wrappers (``{"model": ...}``, ``module.`` prefixes, ...) down to name -> tensor."""
    notes = notes if notes is not None else []
    while not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        if len(obj) > 1:
            notes.append(f"used the checkpoint's {key!r} entry (others: {_first(sorted(k for k in obj if k != key), 5)})")
        obj = dict(obj[key])
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(sd) < len(obj):
        notes.append(f"ignored non-tensor entries: {_first(sorted(k for k in obj if k not in sd), 5)}")
    for prefix in _PREFIXES:
        hits = [k for k in sd if k.startswith(prefix)]
        if not hits:
            continue
        if len(hits) < len(sd):
            notes.append(f"kept the {prefix!r} weights; dropped {len(sd) - len(hits)} others (e.g. a projection head)")
        sd = {k[len(prefix):]: sd[k] for k in hits}
    return sd


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The name of the first layout in ``FORMATS`` whose key test matches."""
    for name, (test, _) in FORMATS.items():
        if test(state_dict):
            return name
    raise WeightsError(
        f"unknown checkpoint format; first keys: {_first(list(state_dict), 8)}. Supported: timm/DeiT ViT, "
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
            problems.append(f"missing from the checkpoint: {_first(missing)}")
        if unexpected:
            problems.append(f"not in the model: {_first(unexpected)}")
        if mismatched:
            shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}" for k in mismatched]
            problems.append(f"shape mismatch: {_first(shapes)}")
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


# ---------------------------------------------------------------------- saving
def _plain_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no storage, which safetensors requires."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        t = v.detach().cpu()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        # Tied or view tensors share storage; safetensors refuses that, so they are copied.
        out[k] = t.clone().contiguous() if ptr in seen or not t.is_contiguous() else t
        seen.add(ptr)
    return out


def save_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` to a safetensors file that ``create_model(path)`` rebuilds.

    The metadata holds ``vitkit_version``, ``model_name``, ``model_args`` and ``card`` (JSON). The
    write goes to a temporary file renamed over ``path``, so a crash never leaves a half file.
    """
    from safetensors.torch import save_file

    from .. import __version__

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"save_weights writes safetensors; name the file *.safetensors, got {path.name}")
    card = getattr(model, "card", None)
    try:
        metadata = {
            "vitkit_version": __version__,
            "model_name": getattr(model, "model_name", ""),
            "model_args": json.dumps(getattr(model, "model_args", {})),
            "card": json.dumps(card.to_dict() if card is not None else {}),
        }
    except TypeError as e:
        raise ConfigError(f"model_args must be JSON serialisable to be saved with the weights: {e}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp_{path.name}.{os.getpid()}")
    try:
        save_file(_plain_tensors(model), tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file (``save_weights`` stores the model config there)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise _corrupt(Path(path), e) from None


def model_from_file(
    path: str | os.PathLike,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    in_chans: int | None = None,
    **overrides,
) -> nn.Module:
    """Rebuild the model saved by ``save_weights`` and load its weights.

    Overrides change the architecture before loading; the weights adapt (a new ``img_size``
    resamples the position embedding, a new ``num_classes`` starts a fresh head).
    """
    from ..models import create_model

    meta = read_metadata(path)
    if not meta.get("model_name"):
        raise WeightsError(
            f"{path} has no vitkit metadata (it was not written by save_weights); build the model with "
            "vitkit.create_model(name) and call vitkit.load_weights(model, path)"
        )
    args = json.loads(meta.get("model_args", "{}"))
    args.update(overrides)
    for key, value in (("num_classes", num_classes), ("img_size", img_size), ("in_chans", in_chans)):
        if value is not None:
            args[key] = value
    model = create_model(meta["model_name"], **args)
    load_weights(model, path, verbose=False)
    saved_card = json.loads(meta.get("card", "{}"))
    labels = tuple(saved_card.get("labels") or ())
    if labels and len(labels) == model.num_classes:
        # Class names and the normalisation the weights were trained with travel with them.
        keep = {k: tuple(saved_card[k]) for k in ("mean", "std") if len(saved_card.get(k) or ()) == model.in_chans}
        model.card = replace(model.card, labels=labels, **keep)
    return model
