"""Hugging Face transformers DPT checkpoints (``DPTForDepthEstimation``, ``DPTForSemanticSegmentation``
on a plain ViT) -> a vitkit ViT backbone plus the ``dpt`` head.

The backbone's keys go through :func:`vitkit.convert.hf.convert_hf` (the one HF ViT mapping); the
neck and head keys map onto :class:`vitkit.dense.heads.dpt.DPTHead`:

- ``neck.reassemble_stage.readout_projects.i`` -> ``reassemble.i.readout``;
  ``layers.i.projection`` / ``layers.i.resize`` -> ``reassemble.i.proj`` / ``.resample``;
  ``neck.convs.i`` -> ``reassemble.i.conv``.
- ``neck.fusion_stage.layers.j`` (deepest first) -> ``fusion.(n-1-j)`` (level order), with
  ``residual_layer1/2`` -> ``res1/res2``, ``convolution1/2`` -> ``conv1/2``, ``batch_norm1/2`` ->
  ``bn1/2``, ``projection`` -> ``out_conv``. The deepest block's ``residual_layer1`` is never run
  (it has no skip input) and is dropped.
- ``head.head`` -> ``output``; ``head.projection`` (``add_projection``) -> ``project.0``.
- ``auxiliary_head`` is dropped: it only adds a training loss (transformers applies it to the same
  finest fused map, weight ``auxiliary_loss_weight``; DPT's release builds it and never calls it).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..convert.hf import convert_hf
from ..errors import ConfigError
from ..models import get_model_card, list_models

# transformers' DPTConfig defaults, for config.json files that leave a key out.
_HF_DEFAULTS = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
    layer_norm_eps=1e-12, image_size=384, patch_size=16, num_channels=3, is_hybrid=False, qkv_bias=True,
    backbone_out_indices=(2, 5, 8, 11), readout_type="project", reassemble_factors=(4, 2, 1, 0.5),
    neck_hidden_sizes=(96, 192, 384, 768), fusion_hidden_size=256, head_in_index=-1,
    use_batch_norm_in_fusion_residual=False, use_bias_in_fusion_residual=None, add_projection=False,
    semantic_classifier_dropout=0.1, backbone_config=None, backbone=None,
)
_NECK = [
    (re.compile(r"^neck\.reassemble_stage\.readout_projects\.(\d+)\.0\.(\w+)$"), "reassemble.{0}.readout.0.{1}"),
    (re.compile(r"^neck\.reassemble_stage\.layers\.(\d+)\.projection\.(\w+)$"), "reassemble.{0}.proj.{1}"),
    (re.compile(r"^neck\.reassemble_stage\.layers\.(\d+)\.resize\.(\w+)$"), "reassemble.{0}.resample.{1}"),
    (re.compile(r"^neck\.convs\.(\d+)\.(\w+)$"), "reassemble.{0}.conv.{1}"),
    (re.compile(r"^head\.head\.(\d+)\.(\w+)$"), "output.{0}.{1}"),
    (re.compile(r"^head\.projection\.(\w+)$"), "project.0.{0}"),
]
_FUSION = re.compile(r"^neck\.fusion_stage\.layers\.(\d+)\.(.+)$")
_FUSION_PARTS = {
    "residual_layer1": "res1", "residual_layer2": "res2", "convolution1": "conv1", "convolution2": "conv2",
    "batch_norm1": "bn1", "batch_norm2": "bn2", "projection": "out_conv",
}


def _config_dict(config: Any) -> dict:
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {**_HF_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k in ("backbone_config", "backbone")}}


def _check_supported(cfg: dict) -> None:
    if cfg["is_hybrid"]:
        raise ConfigError(
            "this DPT checkpoint is DPT-Hybrid (a ResNet stem feeds the ViT); vitkit converts DPT on a plain ViT "
            "(is_hybrid=False) only"
        )
    if cfg.get("backbone_config") or cfg.get("backbone"):
        bc = cfg.get("backbone_config") or {}
        kind = bc.get("model_type", cfg.get("backbone")) if isinstance(bc, dict) else type(bc).__name__
        raise ConfigError(
            f"this DPT checkpoint runs on a separate {kind} backbone (backbone_config); vitkit converts DPT on "
            "transformers' own ViT (no backbone_config) only"
        )
    if cfg["hidden_act"] != "gelu":
        raise ConfigError(f"DPT's ViT uses hidden_act='gelu'; this config has {cfg['hidden_act']!r}")
    if cfg["head_in_index"] not in (-1, len(cfg["neck_hidden_sizes"]) - 1):
        raise ConfigError(
            f"head_in_index={cfg['head_in_index']} feeds the head from a coarser fusion output; vitkit's DPT head "
            "reads the last (finest) one, as DPT does"
        )
    if len(cfg["backbone_out_indices"]) != len(cfg["neck_hidden_sizes"]):
        raise ConfigError(
            f"backbone_out_indices {list(cfg['backbone_out_indices'])} and neck_hidden_sizes "
            f"{list(cfg['neck_hidden_sizes'])} must have one entry per level"
        )


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def _backbone_name(embed_dim: int, depth: int, heads: int, patch: int, img: int) -> str:
    """A registered ViT of exactly this shape where there is one (vit_large_patch16_384 for DPT-Large)."""
    for name in list_models("vit_*_patch*_*"):
        card = get_model_card(name)
        c = card.config
        if (c.get("embed_dim"), c.get("depth"), c.get("num_heads"), c.get("patch_size")) == (embed_dim, depth, heads, patch) \
                and card.input_size[1:] == (img, img) and set(c) <= {"embed_dim", "depth", "num_heads", "patch_size", "img_size"}:
            return name
    return "vit_base_patch16_384"


def convert_hf_dpt(
    state_dict: dict[str, torch.Tensor], config: Any, notes: list[str] | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """transformers DPT state dict + its config (a ``DPTConfig`` or the config.json dict) ->
    ``(model_args, state_dict)``.

    ``model_args`` = dict(backbone, head="dpt", task, num_classes, img_size, in_chans,
    backbone_args, head_args): ``vitkit.create_model(backbone, num_classes=0, img_size=...,
    in_chans=..., **backbone_args)`` and ``DPTHead(backbone, out_chans, **head_args)`` rebuild the
    model (``create_dense_model(**model_args)`` does both). The state dict has ``backbone.`` and
    ``head.`` keys and loads strictly. ``notes`` collects what was dropped or differs.
    """
    notes = notes if notes is not None else []
    cfg = _config_dict(config)
    _check_supported(cfg)
    if "head.head.1.running_mean" in state_dict:
        task = "segment"
    elif "head.head.4.weight" in state_dict:
        task = "depth"
    else:
        raise ConfigError(
            "not a transformers DPTForDepthEstimation / DPTForSemanticSegmentation state dict: no head.head.* keys "
            "(a bare DPTModel has no neck or head to convert)"
        )
    out_chans = state_dict["head.head.4.weight"].shape[0]
    dim, depth, heads = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    img, patch = _pair(cfg["image_size"]), _pair(cfg["patch_size"])
    if img[0] != img[1] or patch[0] != patch[1]:
        raise ConfigError(f"vitkit converts square DPT configs; this one has image_size {img} and patch_size {patch}")
    n = len(cfg["neck_hidden_sizes"])

    backbone_sd = {k[len("dpt."):]: v for k, v in state_dict.items() if k.startswith("dpt.")}
    out = {f"backbone.{k}": v for k, v in convert_hf(backbone_sd, notes).items()}
    fusion_dropped = aux_dropped = False
    for key, v in state_dict.items():
        if key.startswith("dpt."):
            continue
        if key.startswith("auxiliary_head."):
            aux_dropped = True
            continue
        if m := _FUSION.match(key):
            level = n - 1 - int(m[1])
            rest = m[2]
            if level == n - 1 and rest.startswith("residual_layer1."):
                fusion_dropped = True
                continue
            rest = ".".join(_FUSION_PARTS.get(p, p) for p in rest.split("."))
            out[f"head.fusion.{level}.{rest}"] = v
            continue
        for pattern, target in _NECK:
            if m := pattern.match(key):
                out["head." + target.format(*m.groups())] = v
                break
        else:
            out[key] = v  # unknown: left for the strict load to report

    if aux_dropped:
        notes.append(
            "auxiliary_head dropped: it only adds a training loss (transformers: on the finest fused map, weight "
            f"{cfg.get('auxiliary_loss_weight', 0.4)}); the logits do not use it"
        )
    if fusion_dropped:
        notes.append("the deepest fusion block's residual_layer1 dropped: it has no skip input and never runs")
    if float(cfg["layer_norm_eps"]) != 1e-6:
        notes.append(
            f"the checkpoint's config says layer_norm_eps={cfg['layer_norm_eps']}; vitkit's ViT uses 1e-6 (as DPT's "
            "timm backbone does), so features differ slightly (about 1e-5 relative)"
        )
    mlp_ratio = int(cfg["intermediate_size"]) / dim
    backbone_args = dict(
        embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch[0], mlp_ratio=mlp_ratio,
        qkv_bias=bool(cfg["qkv_bias"]),
        # transformers (like DPT's reference) resamples the position embedding bilinearly at other sizes.
        pos_embed_interp="bilinear",
    )
    fusion_bn = bool(cfg["use_batch_norm_in_fusion_residual"])
    bias = cfg["use_bias_in_fusion_residual"]
    head_args = dict(
        task=task,
        layers=sorted(int(i) for i in cfg["backbone_out_indices"]),
        features=int(cfg["fusion_hidden_size"]),
        neck_chans=[int(c) for c in cfg["neck_hidden_sizes"]],
        readout=cfg["readout_type"],
        resample=[float(f) if float(f) != int(f) else int(f) for f in cfg["reassemble_factors"]],
        fusion_bn=fusion_bn,
        fusion_bias=(not fusion_bn) if bias is None else bool(bias),
    )
    if task == "segment":
        head_args["dropout"] = float(cfg["semantic_classifier_dropout"])
    elif cfg["add_projection"]:
        head_args["depth_projection"] = True
    model_args = dict(
        backbone=_backbone_name(dim, depth, heads, patch[0], img[0]),
        head="dpt",
        task=task,
        num_classes=int(out_chans) if task == "segment" else None,
        img_size=img[0],
        in_chans=int(cfg["num_channels"]),
        backbone_args=backbone_args,
        head_args=head_args,
    )
    return model_args, out


__all__ = ["convert_hf_dpt"]
