"""Export a model to ONNX (checked with onnxruntime), a torch.export program, or safetensors.

Every export is verified on the same random input: the exported model runs (onnxruntime for
ONNX, the loaded program for torch.export, a rebuilt model for safetensors) and the largest
absolute difference from the eager torch output is reported; float32 exports must agree to 1e-4.
A parameter-efficient fine-tuning run exports ``merge``d (LoRA folded into the base weights),
checked against the unmerged model the same way.

>>> from vitkit.export import export
>>> export("runs/my-run", "onnx", dynamic_batch=True)
{'path': 'runs/my-run/model.onnx', 'max_abs_diff': 2.4e-06, 'ok': True, ...}
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, VitkitError
from ..models import create_model
from ..source import load_model
from ..weights_io import save_weights

FORMATS = ("onnx", "safetensors", "pt2")
TOLERANCE = 1e-4
DEFAULT_OPSET = 18
_SUFFIX = {"onnx": ".onnx", "safetensors": ".safetensors", "pt2": ".pt2"}
# One file holds at most 2 GiB of ONNX protobuf; bigger models keep their weights beside it.
_ONNX_INLINE_LIMIT = 1 << 30


class ExportError(VitkitError, RuntimeError):
    """The model could not be exported in the asked format."""


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{module} is needed for this export: pip install 'vitkit[export]'") from None


def _example(model: nn.Module, batch: int, img_size: int | tuple[int, int] | None) -> torch.Tensor:
    card = getattr(model, "card", None)
    c, h, w = card.input_size if card is not None else (3, 224, 224)
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, c, h, w, generator=gen)


def _max_diff(a, b) -> float:
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())


def _result(fmt: str, path: Path, diff: float, check_batch: int, **extra) -> dict:
    return {
        "format": fmt, "path": str(path), "max_abs_diff": diff, "tolerance": TOLERANCE, "ok": diff <= TOLERANCE,
        "checked_batch": check_batch, **extra,
    }


def export_onnx(
    model: nn.Module, path: str | os.PathLike, *, dynamic_batch: bool = False, opset: int = DEFAULT_OPSET,
    img_size: int | tuple[int, int] | None = None,
) -> dict:
    """Write ``model`` as ONNX (input ``images`` (B, C, H, W), output ``logits``) and check it with onnxruntime.

    With ``dynamic_batch`` the batch dimension is symbolic and the check runs at a batch size
    other than the traced one. Returns the path, the max abs difference and whether it is within 1e-4.
    """
    _require("onnx")
    ort = _require("onnxruntime")
    model = model.eval().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _example(model, 2 if dynamic_batch else 1, img_size)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > _ONNX_INLINE_LIMIT
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (x,), str(path), input_names=["images"], output_names=["logits"], opset_version=opset,
                dynamo=True, dynamic_shapes=dynamic_shapes, external_data=big, verbose=False,
            )
    except Exception as e:  # noqa: BLE001 - the exporter raises many kinds; the user needs its message
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {type(e).__name__}: {e}"[:2000]) from e
    check = _example(model, 3 if dynamic_batch else 1, img_size)
    with torch.no_grad():
        expected = model(check)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": check.numpy()})[0]
    return _result("onnx", path, _max_diff(got, expected), check.shape[0], opset=opset, dynamic_batch=dynamic_batch,
                   onnxruntime=ort.__version__)


def export_program(
    model: nn.Module, path: str | os.PathLike, *, dynamic_batch: bool = False,
    img_size: int | tuple[int, int] | None = None,
) -> dict:
    """Write ``model`` as a ``torch.export`` program (``.pt2``, load with ``torch.export.load``) and check it."""
    model = model.eval().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _example(model, 2 if dynamic_batch else 1, img_size)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    try:
        program = torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes)
        torch.export.save(program, str(path))
    except Exception as e:  # noqa: BLE001 - as for ONNX: pass the exporter's reason on
        raise ExportError(f"torch.export of {type(model).__name__} failed: {type(e).__name__}: {e}"[:2000]) from e
    check = _example(model, 3 if dynamic_batch else 1, img_size)
    with torch.no_grad():
        expected = model(check)
        got = torch.export.load(str(path)).module()(check)
    return _result("pt2", path, _max_diff(got, expected), check.shape[0], dynamic_batch=dynamic_batch)


def export_safetensors(model: nn.Module, path: str | os.PathLike) -> dict:
    """Write the weights with their model config (``create_model(path)`` rebuilds it) and check the rebuild."""
    model = model.eval().cpu()
    path = save_weights(model, path)
    x = _example(model, 1, None)
    with torch.no_grad():
        diff = _max_diff(create_model(str(path)).eval()(x), model(x))
    return _result("safetensors", path, diff, 1)


def export(
    source: str | os.PathLike, fmt: str = "onnx", out: str | os.PathLike | None = None, *,
    dynamic_batch: bool = False, opset: int = DEFAULT_OPSET, img_size: int | None = None, use_ema: bool = False,
    merge: bool = False,
) -> dict:
    """Export a run directory, checkpoint, weights file or any source of :func:`vitkit.load_model`.

    out: the file to write; by default ``model.<suffix>`` beside the weights (in the run
    directory for a run; ``model.merged.safetensors`` for a merged safetensors export).
    merge: a parameter-efficient fine-tuning run as a plain model (LoRA folded into the base
    weights, see :func:`vitkit.peft.io.merge_peft`): its safetensors load in timm or vitkit without
    the run. The result's ``merge_max_abs_diff`` compares the merged model with the run's.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} must be one of {FORMATS}")
    if opset < 14:
        raise ConfigError(f"opset {opset} is too old for attention's operators; use 14 or newer (default {DEFAULT_OPSET})")
    loaded = load_model(source, use_ema=use_ema, device="cpu")
    model, merged = _peft_ready(loaded.model, fmt, merge, source)
    if out is None:
        out = loaded.home / ("model.merged.safetensors" if merged and fmt == "safetensors" else f"model{_SUFFIX[fmt]}")
        if fmt == "safetensors" and loaded.weights is not None and out.resolve() == loaded.weights.resolve():
            out = loaded.home / "model.export.safetensors"
    out = Path(out)
    if out.suffix != _SUFFIX[fmt]:
        raise ConfigError(f"a {fmt} export is written to a *{_SUFFIX[fmt]} file, got {out.name}")
    if loaded.is_detect:
        raise ConfigError(
            f"{source} is a detector ({type(loaded.model).__name__}); this version of vitkit does not export "
            "detectors (their outputs are dicts decoded by the model's own postprocess). Its weights file "
            f"{loaded.weights or 'model.safetensors'} already describes itself: vitkit.load_model reads it"
        )
    if fmt == "onnx":
        result = export_onnx(model, out, dynamic_batch=dynamic_batch, opset=opset, img_size=img_size)
    elif fmt == "pt2":
        result = export_program(model, out, dynamic_batch=dynamic_batch, img_size=img_size)
    else:
        result = export_safetensors(model, out)
    if merged:
        result["merged"], result["merge_max_abs_diff"] = merged
        result["ok"] = result["ok"] and merged[1] <= TOLERANCE
    result["source"] = str(loaded.weights or source)
    result["model"] = getattr(model, "model_name", type(model).__name__)
    return result


def _peft_ready(model: nn.Module, fmt: str, merge: bool, source) -> tuple[nn.Module, tuple[str, float] | None]:
    """The model to export and, when merged, (its method, the largest output change merging made)."""
    from ..peft.io import IN_PLACE, MERGEABLE, merge_peft

    info = getattr(model, "peft_info", None)
    if not merge:
        if info is not None and fmt == "safetensors" and info.method not in IN_PLACE:
            fix = ("pass --merge for a plain weights file (LoRA folds into the base)" if info.method in MERGEABLE else
                   "export it as onnx or pt2 (they run it as it is)")
            raise ConfigError(
                f"{source} was fine-tuned with {info.method}: a safetensors file of it would need the run's peft "
                f"config to load; {fix}, or load the run itself with vitkit.load_model"
            )
        return model, None
    if info is None:
        raise ConfigError(
            f"{source} was not fine-tuned with a parameter-efficient method (no peft section): there is nothing "
            "to merge; export it without --merge"
        )
    x = _example(model, 2, None)
    with torch.no_grad():
        before = model.eval()(x)
        merged = merge_peft(model).eval()
        diff = _max_diff(merged(x), before)
    return merged, (info.method, diff)
