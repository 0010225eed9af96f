"""Hugging Face ``DeformableDetrForObjectDetection`` checkpoints -> vitkit's Deformable DETR."""

from __future__ import annotations

import re

import torch

from ..errors import ConfigError

_ENCODER = {"self_attn_layer_norm": "norm1", "mlp.fc1": "linear1", "mlp.fc2": "linear2", "final_layer_norm": "norm2"}
_DECODER = {"encoder_attn_layer_norm": "norm1", "self_attn_layer_norm": "norm2", "final_layer_norm": "norm3",
            "mlp.fc1": "linear1", "mlp.fc2": "linear2", "encoder_attn": "cross_attn", "self_attn.o_proj": "self_attn.out_proj"}
_SAME = ("input_proj.", "level_embed", "reference_points.", "enc_output.", "enc_output_norm.", "pos_trans.",
         "pos_trans_norm.")


def _get(config, name, default=None):
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def _model_args(config) -> dict:
    bb = _get(config, "backbone_config")
    bb_type = _get(bb, "model_type") if bb is not None else None
    if bb_type != "timm_backbone":
        raise ConfigError(f"only timm ResNet backbones convert (backbone_config.model_type='timm_backbone'), "
                          f"this config has {bb_type!r}")
    if _get(config, "activation_function", "relu") != "relu" or _get(config, "position_embedding_type", "sine") != "sine":
        raise ConfigError("only the paper's ReLU FFNs and sine positions convert")
    if _get(config, "dilation", False):
        raise ConfigError("dilated (DC5) backbones do not convert")
    heads, ffn = _get(config, "encoder_attention_heads"), _get(config, "encoder_ffn_dim")
    if (_get(config, "decoder_attention_heads"), _get(config, "decoder_ffn_dim")) != (heads, ffn):
        raise ConfigError("the encoder and decoder must share their head count and FFN width")
    two_stage = bool(_get(config, "two_stage"))
    if not (_get(config, "num_labels") or _get(config, "id2label")):
        raise ConfigError("the config names no classes (num_labels or id2label): cannot size the class heads")
    return dict(
        name="deformable_detr", backbone=_get(bb, "backbone"),
        num_classes=_get(config, "num_labels") or len(_get(config, "id2label")),
        num_queries=_get(config, "two_stage_num_proposals" if two_stage else "num_queries"),
        d_model=_get(config, "d_model"), enc_layers=_get(config, "encoder_layers"),
        dec_layers=_get(config, "decoder_layers"), nheads=heads, dim_feedforward=ffn,
        dropout=_get(config, "dropout"), num_feature_levels=_get(config, "num_feature_levels"),
        enc_n_points=_get(config, "encoder_n_points"), dec_n_points=_get(config, "decoder_n_points"),
        with_box_refine=bool(_get(config, "with_box_refine")), two_stage=two_stage,
        focal_alpha=_get(config, "focal_alpha", 0.25),
    )


def convert_hf_deformable_detr(state_dict: dict[str, torch.Tensor], config) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(model_args, state_dict)`` for :class:`~vitkit.detect.deformable_detr.DeformableDETR` from a
    Hugging Face ``DeformableDetrForObjectDetection`` state dict and its config (object or dict).

    ``create_detector(**model_args)`` builds the model that loads the returned state dict. Per-layer
    heads come from the decoder's copies where HF keeps them (box refinement, two-stage).
    """
    args = _model_args(config)
    n_heads = args["dec_layers"] + (1 if args["two_stage"] else 0)
    per_layer = args["with_box_refine"]
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("model.backbone.model."):
            out["backbone." + key[len("model.backbone.model."):]] = value
            continue
        if key.startswith("model.query_position_embeddings."):
            out["query_embed." + key.rsplit(".", 1)[1]] = value
            continue
        if m := re.match(r"model\.encoder\.layers\.(\d+)\.(.+)", key):
            rest = m[2]
            for a, b in _ENCODER.items():
                rest = rest.replace(a, b, 1) if rest.startswith(a) else rest
            out[f"encoder.{m[1]}.{rest}"] = value
            continue
        if m := re.match(r"model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault(f"decoder.{m[1]}.self_attn.in_proj_{m[3]}", {})[m[2]] = value
            continue
        if m := re.match(r"model\.decoder\.layers\.(\d+)\.(.+)", key):
            rest = m[2]
            for a, b in _DECODER.items():
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            out[f"decoder.{m[1]}.{rest}"] = value
            continue
        if key.startswith("model.") and key[len("model."):].startswith(_SAME):
            out[key[len("model."):]] = value
        elif not key.startswith(("class_embed.", "bbox_embed.", "model.decoder.class_embed.", "model.decoder.bbox_embed.")):
            unknown.append(key)
    if unknown:
        raise ConfigError(f"{len(unknown)} weights of this checkpoint have no place in vitkit's Deformable DETR "
                          f"(e.g. {unknown[:3]}): is it a DeformableDetrForObjectDetection state dict?")
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)

    for head in ("class_embed", "bbox_embed"):
        for i in range(n_heads if per_layer else 1):
            dst = f"{head}.{i}." if per_layer else f"{head}."
            src = f"model.decoder.{head}.{i}."
            if not any(k.startswith(src) for k in state_dict):
                src = f"{head}.{i}."
            found = {dst + k[len(src):]: v for k, v in state_dict.items() if k.startswith(src)}
            if not found:
                raise ConfigError(f"the checkpoint has no {head}.{i}: convert a DeformableDetrForObjectDetection, "
                                  "not the bare DeformableDetrModel")
            out.update(found)
    return args, out
