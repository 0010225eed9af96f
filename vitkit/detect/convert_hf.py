"""Hugging Face ``DetrForObjectDetection`` weights -> vitkit's :class:`~vitkit.detect.detr.DETR`.

Both layouts transformers has written load: the older one (``model.backbone.conv_encoder.model.*``,
``self_attn.out_proj``, ``fc1``/``fc2`` on the layer) and the newer one
(``model.backbone.model.*``, ``o_proj``, ``mlp.fc1``). The backbone must be the timm ResNet that
HF DETR uses by default (``use_timm_backbone=True``): its names are vitkit's ResNet names.
"""

from __future__ import annotations

import re

import torch

from ..errors import ConfigError, WeightsError

_BACKBONE_PREFIXES = ("model.backbone.conv_encoder.model.", "model.backbone.model.")
_IGNORED = ("num_batches_tracked", "mask_head.", "bbox_attention.")

# HF name inside a layer -> vitkit's (reference DETR's) name; the attention projections are handled apart.
_ENCODER = {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"}
_DECODER = {"self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3"}
_FFN = {"fc1": "linear1", "fc2": "linear2", "mlp.fc1": "linear1", "mlp.fc2": "linear2"}
_ATTN = {"self_attn": "self_attn", "encoder_attn": "multihead_attn"}
_SIMPLE = {
    "model.input_projection.weight": "input_proj.weight", "model.input_projection.bias": "input_proj.bias",
    "model.query_position_embeddings.weight": "query_embed.weight",
    "model.decoder.layernorm.weight": "transformer.decoder.norm.weight",
    "model.decoder.layernorm.bias": "transformer.decoder.norm.bias",
    "class_labels_classifier.weight": "class_embed.weight", "class_labels_classifier.bias": "class_embed.bias",
}
_LAYER = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_PROJ = re.compile(r"^(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|o_proj|out_proj)$")


def _config_dict(config) -> dict:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, dict):
        return dict(config)
    raise ConfigError(f"config must be a transformers DetrConfig or its dict (config.json), got {type(config).__name__}")


def _backbone_name(cfg: dict) -> tuple[str, int]:
    """The timm backbone name and the input channels of an HF DETR config."""
    bcfg = cfg.get("backbone_config")
    bcfg = bcfg.to_dict() if hasattr(bcfg, "to_dict") else (bcfg or {})
    if bcfg and bcfg.get("model_type") not in (None, "timm_backbone"):
        raise ConfigError(
            f"this DETR uses a transformers {bcfg.get('model_type')!r} backbone; vitkit converts the timm "
            "ResNet layout (use_timm_backbone=True, the default of facebook/detr-resnet-50)"
        )
    if not bcfg and cfg.get("use_timm_backbone") is False:
        raise ConfigError("this DETR has use_timm_backbone=False; vitkit converts the timm ResNet layout only")
    name = bcfg.get("backbone") or cfg.get("backbone") or "resnet50"
    chans = int(bcfg.get("num_channels") or cfg.get("num_channels") or 3)
    out_indices = bcfg.get("out_indices")
    if out_indices is not None and list(out_indices)[-1] != 4:
        raise ConfigError(f"DETR reads the backbone's last stage; this config's out_indices are {out_indices}")
    if bcfg.get("output_stride") not in (None, 32) or cfg.get("dilation"):
        raise ConfigError("dilated (DC5) DETR backbones are not supported: vitkit's ResNet has no dilation")
    return name, chans


def _check_config(cfg: dict) -> None:
    pairs = [("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")]
    for a, b in pairs:
        if cfg.get(a, 8) != cfg.get(b, 8):
            raise ConfigError(f"vitkit's DETR uses one {a.split('_', 1)[1]} for encoder and decoder; this config has "
                              f"{a}={cfg.get(a)} and {b}={cfg.get(b)}")
    if cfg.get("activation_function", "relu") != "relu":
        raise ConfigError(f"vitkit's DETR uses ReLU, this config has activation_function={cfg['activation_function']!r}")
    if cfg.get("position_embedding_type", "sine") != "sine":
        raise ConfigError(f"vitkit's DETR uses sine positions, this config has "
                          f"position_embedding_type={cfg['position_embedding_type']!r}")


def _layer_key(kind: str, idx: str, name: str, kind_map: dict) -> str | None:
    """vitkit name of one encoder/decoder layer tensor (None for an attention projection)."""
    if _PROJ.match(name):
        return None
    new = kind_map.get(name) or _FFN.get(name)
    if new is None:
        raise WeightsError(f"unexpected DETR {kind} layer key {name!r}: not a DetrForObjectDetection checkpoint?")
    return f"transformer.{kind}.layers.{idx}.{new}"


def convert_hf_detr(state_dict: dict[str, torch.Tensor], config) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(model_args, state_dict)`` for :func:`vitkit.detect.create_detector` from a transformers
    ``DetrForObjectDetection`` state dict and its config (a ``DetrConfig`` or its dict).

    ``create_detector(**model_args)`` builds the model and ``load_state_dict(state_dict)`` loads it
    strictly. Unsupported variants (learned positions, DC5, a non-timm backbone) are a ConfigError.
    """
    cfg = _config_dict(config)
    _check_config(cfg)
    backbone, in_chans = _backbone_name(cfg)
    sd = {k.removeprefix("detr."): v for k, v in state_dict.items() if not any(s in k for s in _IGNORED)}
    if "class_labels_classifier.weight" not in sd:
        raise WeightsError("no class_labels_classifier.weight: not a DetrForObjectDetection state dict")

    out: dict[str, torch.Tensor] = {}
    proj: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, v in sd.items():
        prefix = next((p for p in _BACKBONE_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            out["backbone." + key[len(prefix):]] = v
            if key.endswith(".running_var"):
                # HF's frozen BatchNorm has no counter; vitkit's keeps BatchNorm2d's keys.
                out["backbone." + key[len(prefix):-len("running_var")] + "num_batches_tracked"] = torch.tensor(0)
            continue
        m = _LAYER.match(key)
        if m:
            kind, idx, name, param = m.groups()
            new = _layer_key(kind, idx, name, _ENCODER if kind == "encoder" else _DECODER)
            if new is not None:
                out[f"{new}.{param}"] = v
                continue
            attn, p = _PROJ.match(name).groups()
            target = f"transformer.{kind}.layers.{idx}.{_ATTN[attn]}"
            if p in ("o_proj", "out_proj"):
                out[f"{target}.out_proj.{param}"] = v
            else:
                proj.setdefault((target, param, kind), {})[p] = v
            continue
        if key in _SIMPLE:
            out[_SIMPLE[key]] = v
        elif key.startswith("bbox_predictor.layers."):
            out["bbox_embed." + key.removeprefix("bbox_predictor.")] = v
        else:
            raise WeightsError(f"unexpected key {key!r}: not a DetrForObjectDetection state dict")
    for (target, param, _), parts in proj.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise WeightsError(f"{target}: the checkpoint lacks {sorted({'q_proj', 'k_proj', 'v_proj'} - set(parts))}")
        # nn.MultiheadAttention's packed projection: rows q, then k, then v.
        out[f"{target}.in_proj_{param}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])

    d_model = int(cfg.get("d_model", 256))
    model_args = dict(
        name="detr", backbone=backbone, num_classes=int(sd["class_labels_classifier.weight"].shape[0]) - 1,
        num_queries=int(cfg.get("num_queries", 100)), d_model=d_model,
        enc_layers=int(cfg.get("encoder_layers", 6)), dec_layers=int(cfg.get("decoder_layers", 6)),
        nheads=int(cfg.get("encoder_attention_heads", 8)), dim_feedforward=int(cfg.get("encoder_ffn_dim", 2048)),
        dropout=float(cfg.get("dropout", 0.1)),
        # HF decodes differently with auxiliary losses on; a checkpoint trained so needs the same decoding.
        **({"hf_aux_norm": True} if cfg.get("auxiliary_loss") else {}),
        backbone_args={"in_chans": in_chans} if in_chans != 3 else {},
    )
    return model_args, out


__all__ = ["convert_hf_detr"]
