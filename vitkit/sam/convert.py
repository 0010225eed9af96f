"""SAM checkpoints in other layouts -> vitkit's :class:`~vitkit.sam.Sam` names, and
:func:`load_sam` for any SAM weights file, folder or run directory.

Layouts:
- vitkit: ``image_encoder.blocks.N.mlp.fc1``, ``image_encoder.pos_embed`` (1, h*w, C)...
- segment-anything (the original ``sam_vit_*.pth``): the same names except
  ``image_encoder.pos_embed`` (1, h, w, C) and ``blocks.N.mlp.lin1/lin2``.
- transformers ``SamModel``: ``vision_encoder.*``, ``prompt_encoder.*``,
  ``shared_image_embedding.*``, ``mask_decoder.*``.

Model sizes are read from the tensor shapes; the decoder's head count has no shape of its own
and comes from the matching registered variant (or ``name=`` / ``decoder_heads=``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..errors import ConfigError, PathNotFoundError, WeightsError
from ..rundir import WEIGHTS, RunDir
from ..weights_io import first_keys, read_metadata, read_state_dict, unwrap
from .model import Sam
from .registry import SAM_CONFIGS, SAM_DEFAULTS, build_sam, sam_model_args

_SA_RULES = [(r"^image_encoder\.blocks\.(\d+)\.mlp\.lin([12])\.", r"image_encoder.blocks.\1.mlp.fc\2.")]

_HF_RULES = [
    (r"^vision_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^vision_encoder\.pos_embed$", "image_encoder.pos_embed"),
    (r"^vision_encoder\.layers\.(\d+)\.layer_norm([12])\.", r"image_encoder.blocks.\1.norm\2."),
    (r"^vision_encoder\.layers\.(\d+)\.mlp\.lin([12])\.", r"image_encoder.blocks.\1.mlp.fc\2."),
    (r"^vision_encoder\.layers\.(\d+)\.attn\.", r"image_encoder.blocks.\1.attn."),
    (r"^vision_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^vision_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^vision_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^vision_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"^shared_image_embedding\.positional_embedding$", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^prompt_encoder\.point_embed\.(\d+)\.", r"prompt_encoder.point_embeddings.\1."),
    (r"^(mask_decoder\.transformer\.layers\.\d+)\.layer_norm(\d)\.", r"\1.norm\2."),
    (r"^mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
]

# transformers' feed-forward heads name their linears proj_in, layers.j, proj_out.
_HF_FFN = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.(proj_in|proj_out|layers\.(\d+))\.(.+)$")


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def convert_segment_anything(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A segment-anything state dict (``Sam.state_dict()`` of the reference) -> vitkit names."""
    out = {}
    for k, v in state.items():
        if k in ("pixel_mean", "pixel_std"):
            continue  # vitkit keeps the normalisation in model_args
        if k == "image_encoder.pos_embed" and v.ndim == 4:
            v = v.reshape(v.shape[0], -1, v.shape[-1])  # (1, h, w, C) -> the ViT's (1, h*w, C)
        out[_rename(k, _SA_RULES)] = v
    return out


def convert_hf_sam(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``SamModel`` state dict -> vitkit names."""
    mids: dict[str, int] = {}
    for k in state:
        m = _HF_FFN.match(k)
        if m and m[3] is not None:
            mids[m[1]] = max(mids.get(m[1], 0), int(m[3]) + 1)
    out = {}
    for k, v in state.items():
        if k == "prompt_encoder.shared_embedding.positional_embedding":
            # Tied to shared_image_embedding in SamModel; kept only when that one is absent.
            if "shared_image_embedding.positional_embedding" in state:
                continue
            k = "shared_image_embedding.positional_embedding"
        m = _HF_FFN.match(k)
        if m:
            j = 0 if m[2] == "proj_in" else mids.get(m[1], 0) + 1 if m[2] == "proj_out" else int(m[3]) + 1
            out[f"{m[1]}.layers.{j}.{m[4]}"] = v
            continue
        if k == "vision_encoder.pos_embed" and v.ndim == 4:
            v = v.reshape(v.shape[0], -1, v.shape[-1])
        out[_rename(k, _HF_RULES)] = v
    return out


def detect_layout(state: dict) -> str:
    """'hf', 'segment_anything' or 'vitkit' from the keys of a SAM state dict."""
    keys = list(state)
    if any(k.startswith("vision_encoder.") for k in keys) and any(k.startswith("mask_decoder.") for k in keys):
        return "hf"
    if "image_encoder.pos_embed" in state and "mask_decoder.iou_token.weight" in state:
        if state["image_encoder.pos_embed"].ndim == 4 or any(".mlp.lin1." in k for k in keys):
            return "segment_anything"
        return "vitkit"
    raise WeightsError(
        "these weights are not a SAM checkpoint (no image_encoder.* + mask_decoder.* keys of segment-anything or "
        f"vitkit, nor vision_encoder.* + mask_decoder.* of transformers); first keys: {first_keys(sorted(keys), 6)}"
    )


def _count(state: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m[1] for k in state if (m := rx.match(k))})


def infer_sam_args(state: dict[str, torch.Tensor], **overrides) -> dict:
    """:func:`~vitkit.sam.build_sam` arguments for a vitkit-named SAM state dict, from its shapes.

    The decoder's head count is taken from the registered variant whose sizes match (else 8,
    the paper's); ``overrides`` win over both.
    """
    try:
        proj = state["image_encoder.patch_embed.proj.weight"]
        embed_dim, patch = proj.shape[0], proj.shape[-1]
        grid = round(state["image_encoder.pos_embed"].shape[1] ** 0.5)
        depth = _count(state, r"^image_encoder\.blocks\.(\d+)\.")
        rows = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth)]
        head_dim = state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
        glob = [i for i, r in enumerate(rows) if r == 2 * grid - 1]
        windowed = [r for r in rows if r != 2 * grid - 1]
        prompt_dim = state["mask_decoder.iou_token.weight"].shape[1]
        iou_depth = _count(state, r"^mask_decoder\.iou_prediction_head\.layers\.(\d+)\.")
        args = dict(
            img_size=grid * patch, patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=embed_dim // head_dim,
            mlp_ratio=state["image_encoder.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
            window_size=(windowed[0] + 1) // 2 if windowed else grid,
            global_attn_indexes=glob, prompt_dim=prompt_dim,
            mask_in_chans=state["prompt_encoder.mask_downscaling.3.weight"].shape[0],
            decoder_depth=_count(state, r"^mask_decoder\.transformer\.layers\.(\d+)\."),
            decoder_mlp_dim=state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
            num_multimask_outputs=state["mask_decoder.mask_tokens.weight"].shape[0] - 1, iou_head_depth=iou_depth,
            iou_head_hidden_dim=state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        )
    except KeyError as e:
        raise WeightsError(f"SAM weights lack {e.args[0]}; the file is not a complete SAM checkpoint") from None
    args["mlp_ratio"] = float(args["mlp_ratio"])
    name = None
    for cand, cfg in SAM_CONFIGS.items():
        full = dict(SAM_DEFAULTS, **cfg)
        if all(full[k] == v for k, v in args.items() if k not in ("mlp_ratio",)):
            name = cand
            args["decoder_heads"] = full["decoder_heads"]
            break
    args.update(overrides)
    args.setdefault("name", name or "sam")
    return args


def _hf_config_args(folder: Path) -> dict:
    """build_sam arguments the transformers config.json of ``folder`` states (heads, epsilon, normalisation)."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    dec, out = cfg.get("mask_decoder_config") or {}, {}
    if "num_attention_heads" in dec:
        out["decoder_heads"] = dec["num_attention_heads"]
    return out


def _weights_file(path: Path) -> Path | None:
    """The weights file ``path`` names: itself, a run's weights, or a folder's model.safetensors."""
    if path.is_dir():
        folder_weights = path / WEIGHTS
        return RunDir(path).weights() if RunDir(path).is_run() else folder_weights if folder_weights.is_file() else None
    return path


def read_sam_args(path: str | os.PathLike) -> dict | None:
    """The SAM ``model_args`` a vitkit weights file (or run directory) carries, else None."""
    weights = _weights_file(Path(path).expanduser())
    meta = read_metadata(weights) if weights is not None and weights.suffix == ".safetensors" else {}
    try:
        args = json.loads(meta.get("model_args") or "{}")
    except json.JSONDecodeError:
        args = None
    return args if isinstance(args, dict) and {"prompt_dim", "decoder_depth"} <= set(args) else None


def _run_config_args(path: Path) -> dict | None:
    """build_sam arguments from the config.yaml of the run ``path`` is (or holds a checkpoint of):
    checkpoint weights carry no config of their own."""
    run = RunDir(path) if RunDir(path).is_run() else RunDir.of_checkpoint(path)
    model = (run.read_config().get("model") or {}) if run is not None else {}
    name = model.get("name")
    if name not in SAM_CONFIGS:
        return None
    extra = {k: v for k, v in (model.get("args") or {}).items() if k in SAM_DEFAULTS}
    return sam_model_args(name, **extra)


def sam_state_dict(state: dict, **overrides) -> tuple[dict[str, torch.Tensor], dict]:
    """Any SAM state dict (vitkit, segment-anything, transformers) -> (vitkit state, build_sam args)."""
    sd = unwrap(dict(state))
    layout = detect_layout(sd)
    sd = {"hf": convert_hf_sam, "segment_anything": convert_segment_anything}.get(layout, dict)(sd)
    return sd, infer_sam_args(sd, **overrides)


def load_into(model: Sam, sd: dict[str, torch.Tensor], where: str) -> Sam:
    """Strict load with a message that names what does not fit."""
    own = model.state_dict()
    problems = {
        "missing": sorted(set(own) - set(sd)),
        "unexpected": sorted(set(sd) - set(own)),
        "other shapes": [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                         if k in sd and sd[k].shape != v.shape],
    }
    found = "; ".join(f"{what}: {first_keys(keys, 5)}" for what, keys in problems.items() if keys)
    if found:
        raise WeightsError(f"{where} does not fit {model.model_name} ({found}); pass name= or the sizes the weights "
                           "were trained with")
    model.load_state_dict(sd)
    return model


def load_sam(path_or_run: str | os.PathLike | dict, name: str | None = None, **overrides) -> Sam:
    """A SAM model with weights, in eval mode.

    Args:
        path_or_run: a vitkit SAM weights file or run directory (rebuilt from the config it
            carries), a segment-anything ``.pth`` (read with ``weights_only=True``) or
            safetensors file, a transformers ``SamModel`` folder or file, or a state dict.
        name: the registered variant the weights are (e.g. ``"sam_vit_b"``); default: read
            from the shapes.
        overrides: build_sam arguments that the weights cannot tell (``decoder_heads``, ``pixel_mean``...).
    """
    if name is not None and name not in SAM_CONFIGS:
        raise ConfigError(f"unknown SAM model {name!r}; choose from {', '.join(sorted(SAM_CONFIGS))}")
    args = None
    source = path_or_run
    if not isinstance(path_or_run, dict):
        p = Path(path_or_run).expanduser()
        if not p.exists():
            raise PathNotFoundError(
                f"no such file or folder: {str(path_or_run)!r}; pass a SAM weights file (.safetensors or .pth), "
                "a transformers SamModel folder or a SAM run directory"
            )
        args = read_sam_args(p) or _run_config_args(p)
        weights = _weights_file(p)
        source = weights if weights is not None else p
        if p.is_dir():
            overrides = {**_hf_config_args(p), **overrides}
    raw, where = read_state_dict(source)
    sd, inferred = sam_state_dict(raw)
    if args is None:
        args = sam_model_args(name) if name else inferred
    args = {**args, **overrides}
    return load_into(build_sam(args), sd, str(where)).eval()


__all__ = [
    "convert_hf_sam", "convert_segment_anything", "detect_layout", "infer_sam_args", "load_sam", "read_sam_args",
    "sam_state_dict",
]
