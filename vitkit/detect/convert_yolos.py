"""Hugging Face transformers ``YolosForObjectDetection`` checkpoints -> vitkit's YOLOS detector.

The ViT keys go through :func:`vitkit.convert.hf.convert_hf` (the one HF ViT mapping) under
``backbone.``; the rest map onto :class:`vitkit.detect.yolos.YOLOS`:

- ``vit.embeddings.position_embeddings`` (1, 1 + patches + Q, D), rows [class, patches, detection]
  -> ``backbone.pos_embed`` (class + patches) and ``det_pos_embed`` (the last Q rows);
- ``vit.embeddings.detection_tokens`` -> ``det_token``;
  ``vit.encoder.interpolation.mid_position_embeddings`` -> ``mid_pos_embed`` (same layout);
- ``class_labels_classifier.layers.i`` -> ``class_embed.layers.i``; ``bbox_predictor.layers.i`` ->
  ``bbox_embed.layers.i``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..convert.hf import convert_hf
from ..errors import ConfigError
from .yolos import _pair

# transformers' YolosConfig defaults, for config.json files that leave a key out.
_HF_DEFAULTS = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
    layer_norm_eps=1e-12, image_size=(512, 864), patch_size=16, num_channels=3, qkv_bias=True,
    num_detection_tokens=100, use_mid_position_embeddings=True, auxiliary_loss=False, class_cost=1, bbox_cost=5,
    giou_cost=2, bbox_loss_coefficient=5, giou_loss_coefficient=2, eos_coefficient=0.1,
)
# YOLOS starts from DeiT (ImageNet normalisation, as transformers' YolosImageProcessor): the card of
# that width names the backbone; backbone_args carry the exact shape.
_DEIT_BY_WIDTH = {192: "deit_tiny_patch16_224", 384: "deit_small_patch16_224", 768: "deit_base_patch16_224"}
_HEADS = re.compile(r"^(class_labels_classifier|bbox_predictor)\.layers\.(\d+)\.(weight|bias)$")
_HEAD_NAMES = {"class_labels_classifier": "class_embed", "bbox_predictor": "bbox_embed"}


def _config_dict(config: Any) -> dict:
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {**_HF_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}


def convert_hf_yolos(
    state_dict: dict[str, torch.Tensor], config: Any, notes: list[str] | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """transformers ``YolosForObjectDetection`` state dict + its config (a ``YolosConfig`` or the
    config.json dict) -> ``(model_args, state_dict)``.

    ``vitkit.detect.create_detector(**model_args)`` builds the model the state dict loads into
    strictly; its logits and boxes equal transformers' at any input size that is a multiple of the
    patch size (vitkit pads other sizes where transformers drops the remainder). ``notes`` collects
    what was dropped or differs.
    """
    notes = notes if notes is not None else []
    cfg = _config_dict(config)
    if "class_labels_classifier.layers.2.weight" not in state_dict:
        raise ConfigError(
            "not a transformers YolosForObjectDetection state dict: no class_labels_classifier.layers.* keys "
            "(a bare YolosModel has no detection heads to convert)"
        )
    if cfg["hidden_act"] != "gelu":
        raise ConfigError(f"YOLOS's ViT uses hidden_act='gelu'; this config has {cfg['hidden_act']!r}")
    patch = _pair(cfg["patch_size"])
    if patch[0] != patch[1]:
        raise ConfigError(f"vitkit converts YOLOS with square patches; this config has patch_size {patch}")
    dim, q = int(cfg["hidden_size"]), int(cfg["num_detection_tokens"])
    num_classes = state_dict["class_labels_classifier.layers.2.weight"].shape[0] - 1
    mid = bool(cfg["use_mid_position_embeddings"])

    out: dict[str, torch.Tensor] = {}
    backbone_sd: dict[str, torch.Tensor] = {}
    for key, v in state_dict.items():
        if key == "vit.embeddings.position_embeddings":
            backbone_sd[key] = v[:, :-q]
            out["det_pos_embed"] = v[:, -q:]
        elif key == "vit.embeddings.detection_tokens":
            out["det_token"] = v
        elif key == "vit.encoder.interpolation.mid_position_embeddings":
            out["mid_pos_embed"] = v
        elif m := _HEADS.match(key):
            out[f"{_HEAD_NAMES[m[1]]}.layers.{m[2]}.{m[3]}"] = v
        elif key.startswith("vit."):
            backbone_sd[key] = v
        else:
            out[key] = v  # unknown: left for the strict load to report
    out.update({f"backbone.{k}": v for k, v in convert_hf(backbone_sd, notes).items()})

    if cfg["auxiliary_loss"]:
        notes.append(
            "auxiliary_loss ignored: transformers applies the heads to every layer's hidden states for an extra "
            "training loss; YOLOS's reference has no decoder layers and no auxiliary losses"
        )
    backbone_args = dict(
        embed_dim=dim, depth=int(cfg["num_hidden_layers"]), num_heads=int(cfg["num_attention_heads"]),
        mlp_ratio=int(cfg["intermediate_size"]) / dim, patch_size=patch[0], qkv_bias=bool(cfg["qkv_bias"]),
        in_chans=int(cfg["num_channels"]),
    )
    pe_size = list(_pair(cfg["image_size"]))
    model_args = dict(
        name="yolos",
        backbone=_DEIT_BY_WIDTH.get(dim, "deit_tiny_patch16_224"),
        num_classes=int(num_classes),
        num_det_tokens=q,
        pe_size=pe_size,
        use_mid_position_embeddings=mid,
        mid_pe_size=pe_size,
        layer_norm_eps=float(cfg["layer_norm_eps"]),
        backbone_args=backbone_args,
        eos_coef=float(cfg["eos_coefficient"]),
        cost_class=float(cfg["class_cost"]),
        cost_bbox=float(cfg["bbox_cost"]),
        cost_giou=float(cfg["giou_cost"]),
        weight_bbox=float(cfg["bbox_loss_coefficient"]),
        weight_giou=float(cfg["giou_loss_coefficient"]),
    )
    return model_args, out


__all__ = ["convert_hf_yolos"]
