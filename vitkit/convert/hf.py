"""Hugging Face transformers checkpoints: ViT, DeiT (with teacher) and DINOv2.

Two key layouts exist: the one in published hub files (``encoder.layer.N.attention.attention.query``,
``intermediate.dense``) and the one transformers 5 models return from ``state_dict()``
(``layers.N.attention.q_proj``, ``mlp.fc1``). Both map here.
"""

from __future__ import annotations

import re

import torch

_MODEL_PREFIXES = ("vit.", "deit.", "dinov2.", "dinov2_with_registers.")
_LAYER = re.compile(r"^(?:encoder\.layers?|layers)\.(\d+)\.(.+)$")
# Separate q/k/v projections, fused into one ``attn.qkv`` (rows q, then k, then v, as timm's).
_QKV = {
    "attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
    "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2,
}
_BLOCK = {
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "norm1": "norm1",
    "norm2": "norm2",
}
# Whole parameter names (no .weight/.bias suffix).
_BLOCK_PARAMS = {"layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
    "cls_classifier.weight": "head.weight",
    "cls_classifier.bias": "head.bias",
    "distillation_classifier.weight": "head_dist.weight",
    "distillation_classifier.bias": "head_dist.bias",
}


def _strip_model_prefix(key: str) -> str:
    for p in _MODEL_PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def is_hf(state_dict: dict[str, torch.Tensor]) -> bool:
    """A transformers ViT/DeiT/DINOv2: ``embeddings.patch_embeddings.projection`` under an optional prefix."""
    return any(_strip_model_prefix(k) == "embeddings.patch_embeddings.projection.weight" for k in state_dict)


def convert_hf(state_dict: dict[str, torch.Tensor], notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """transformers ``ViT*``/``DeiT*``/``Dinov2*`` state dict -> vitkit state dict.

    Dropped, with a note: ``ViTModel``'s pooler (a dense+tanh on the class token that vitkit
    has no equivalent for) and the ``mask_token`` used only for masked-image modelling.
    ``DeiTForImageClassification`` (not ``...WithTeacher``) classifies from the class token
    alone; its classifier is copied to both vitkit heads, so the averaged logits differ from HF's.
    """
    notes = notes if notes is not None else []
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], list[torch.Tensor | None]] = {}
    dropped = []
    for key, v in state_dict.items():
        k = _strip_model_prefix(key)
        if m := _LAYER.match(k):
            idx, rest = int(m[1]), m[2]
            name, _, kind = rest.rpartition(".")
            if rest in _BLOCK_PARAMS:
                out[f"blocks.{idx}.{_BLOCK_PARAMS[rest]}"] = v
            elif name in _QKV:
                qkv.setdefault((idx, kind), [None, None, None])[_QKV[name]] = v
            elif name in _BLOCK:
                out[f"blocks.{idx}.{_BLOCK[name]}.{kind}"] = v
            else:
                out[key] = v  # unknown: left for the strict load to report
        elif k in _TOP:
            out[_TOP[k]] = v
        elif k.startswith("pooler.") or k == "embeddings.mask_token":
            dropped.append(key)
        else:
            out[key] = v
    for (idx, kind), parts in qkv.items():
        if any(p is None for p in parts):
            raise ValueError(f"layer {idx} has only some of the query/key/value {kind} tensors; the checkpoint is incomplete")
        out[f"blocks.{idx}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    if any(k.startswith("pooler.") for k in dropped):
        notes.append("ViTModel pooler (dense + tanh on the class token) dropped: vitkit models have no pooler")
    if any(k.endswith("mask_token") for k in dropped):
        notes.append("embeddings.mask_token dropped (only used for masked-image modelling)")

    head = out.get("head.weight")
    if head is not None and "norm.weight" in out and head.shape[-1] == 2 * out["norm.weight"].shape[0]:
        # Dinov2ForImageClassification reads [class token, mean of patch tokens] (2*D inputs).
        out.pop("head.weight")
        out.pop("head.bias", None)
        notes.append("Dinov2ForImageClassification head dropped: it reads [cls, mean(patches)], vitkit heads read D features")
    elif head is not None and "dist_token" in out and "head_dist.weight" not in out:
        out["head_dist.weight"] = out["head.weight"]
        if "head.bias" in out:
            out["head_dist.bias"] = out["head.bias"]
        notes.append(
            "DeiTForImageClassification classifies from the class token only; its classifier was copied to "
            "head and head_dist, so vitkit's logits (mean of both heads) differ from HF's. For HF's exact "
            "logits use model.head(model.forward_features(x)[:, 0])"
        )
    return out
