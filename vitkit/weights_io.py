"""Weight files on disk and on the Hugging Face hub: read, unwrap, write. No model knowledge.

``read_state_dict`` turns a source (safetensors, ``.pth/.bin`` read with
``torch.load(weights_only=True)``, a folder, a sharded index or a hub repo id resolved through
the local hub cache) into a raw checkpoint object; ``unwrap`` strips training wrappers down to
name -> tensor. ``save_weights`` writes a model as safetensors with its config in the metadata,
which ``read_metadata`` returns. Layout conversion lives in :mod:`vitkit.convert`, model building
in :mod:`vitkit.models`; both sit above this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ._version import __version__
from .errors import ConfigError, PathNotFoundError, WeightsError

# Training scripts nest the weights; the first key found wins (a DINO run's teacher is the model to use).
_WRAPPERS = ("state_dict", "model", "teacher", "student", "module", "net")
# DDP, torch.compile and self-supervised trainers prefix every key.
_PREFIXES = ("module.", "_orig_mod.", "backbone.")
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# The file names a Hugging Face hub repo publishes its weights under, in the order they are tried.
HUB_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def first_keys(keys: list[str], n: int = 10) -> str:
    """``keys[:n]`` joined, with how many more there are: for messages that list keys."""
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


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
    for name in HUB_FILES:
        if (path / name).is_file():
            return _read_file(path / name)
    files = [p for p in sorted(path.iterdir()) if p.suffix in (".safetensors", *_PICKLE_SUFFIXES)]
    if len(files) == 1:
        return _read_file(files[0])
    found = ", ".join(p.name for p in files) or "no weight files"
    raise WeightsError(f"folder {path} has no {HUB_FILES[0]} or {HUB_FILES[2]} ({found}); pass the file to load")


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
        for name in HUB_FILES:
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
        f"{' or '.join(HUB_FILES[::2])}; check the id"
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
            notes.append(f"used the checkpoint's {key!r} entry (others: {first_keys(sorted(k for k in obj if k != key), 5)})")
        obj = dict(obj[key])
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(sd) < len(obj):
        notes.append(f"ignored non-tensor entries: {first_keys(sorted(k for k in obj if k not in sd), 5)}")
    for prefix in _PREFIXES:
        hits = [k for k in sd if k.startswith(prefix)]
        if not hits:
            continue
        if len(hits) < len(sd):
            notes.append(f"kept the {prefix!r} weights; dropped {len(sd) - len(hits)} others (e.g. a projection head)")
        sd = {k[len(prefix):]: sd[k] for k in hits}
    return sd


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


def state_sha256(model_or_state: nn.Module | Mapping[str, torch.Tensor], exclude: Iterable[str] = ()) -> str:
    """sha256 over the sorted ``(name, dtype, shape, bytes)`` of a state dict, minus the modules or keys
    named in ``exclude`` (``head``): the identity of a model's weights.

    Hashing tensors rather than a file gives one rule for every source (run dir, file, hub, format)
    and ignores file metadata that does not change what the model computes. Teachers, judges,
    tokenizers and PEFT bases are all recorded by it.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    exclude = tuple(exclude)
    h = hashlib.sha256()
    for name in sorted(state):
        if any(name == p or name.startswith(p + ".") for p in exclude):
            continue
        t = state[name].detach().cpu().contiguous().reshape(-1)  # 1-D: a 0-d tensor has no byte view
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
