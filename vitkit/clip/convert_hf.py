"""transformers ``CLIPModel`` and ``SiglipModel`` checkpoints -> :class:`~vitkit.clip.model.TwoTower`.

Each converter takes the model's state dict and its ``config.json`` dict and returns
``(model_args, state_dict)``: ``build_two_tower(model_args)`` builds the model that loads the
state dict strictly. Sizes are read from the tensors; what the tensors cannot tell (heads,
activation, norm epsilon, image size, the end-of-text id) from the config, with transformers'
defaults for keys a saved config leaves out.
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import ConfigError, WeightsError
from .model import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SIGLIP_MEAN, SIGLIP_STD

# transformers' activation names -> vitkit's (gelu_new and gelu_fast are tanh approximations of GELU).
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
         "gelu_fast": "gelu_tanh"}
# Defaults of transformers' configs for the keys the converters read.
_CLIP_DEFAULTS = {
    "vision": dict(num_attention_heads=12, image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "text": dict(num_attention_heads=8, hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407),
}
_SIGLIP_DEFAULTS = {
    "vision": dict(num_attention_heads=12, image_size=224, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                   vision_use_head=True),
    "text": dict(num_attention_heads=12, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}
_LAYER = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
_BLOCK = {"self_attn.out_proj": "attn.proj", "layer_norm1": "norm1", "layer_norm2": "norm2",
          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_TOWER = {"vision_model": "visual", "text_model": "text"}
_TOP = {
    "vision_model.embeddings.patch_embedding.weight": "visual.patch_embed.proj.weight",
    "vision_model.embeddings.patch_embedding.bias": "visual.patch_embed.proj.bias",
    "vision_model.pre_layrnorm.weight": "visual.norm_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.norm_pre.bias",
    "vision_model.post_layernorm.weight": "visual.norm.weight",
    "vision_model.post_layernorm.bias": "visual.norm.bias",
    "vision_model.head.attention.out_proj.weight": "visual.attn_pool.proj.weight",
    "vision_model.head.attention.out_proj.bias": "visual.attn_pool.proj.bias",
    "vision_model.head.layernorm.weight": "visual.attn_pool.norm.weight",
    "vision_model.head.layernorm.bias": "visual.attn_pool.norm.bias",
    "vision_model.head.mlp.fc1.weight": "visual.attn_pool.mlp.fc1.weight",
    "vision_model.head.mlp.fc1.bias": "visual.attn_pool.mlp.fc1.bias",
    "vision_model.head.mlp.fc2.weight": "visual.attn_pool.mlp.fc2.weight",
    "vision_model.head.mlp.fc2.bias": "visual.attn_pool.mlp.fc2.bias",
    "text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
    "text_model.final_layer_norm.weight": "text.norm.weight",
    "text_model.final_layer_norm.bias": "text.norm.bias",
    "text_model.head.weight": "text.proj.weight",
    "text_model.head.bias": "text.proj.bias",
    "text_projection.weight": "text.proj.weight",
    "visual_projection.weight": "visual_proj.weight",
}


def _sub_config(config: dict, tower: str, defaults: dict) -> dict:
    sub = config.get(f"{tower}_config") or {}
    if not isinstance(sub, dict):
        sub = sub.to_dict()
    return {**defaults[tower], **{k: v for k, v in sub.items() if v is not None}}


def _act(name: str, where: str) -> str:
    if name not in _ACTS:
        raise ConfigError(f"{where} hidden_act {name!r} has no vitkit equivalent; supported: {', '.join(_ACTS)}")
    return _ACTS[name]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def _mlp_ratio(width: int, hidden: int) -> float:
    """A ratio with ``int(width * ratio) == hidden`` (blocks build their MLP that way)."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _need(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise WeightsError(f"the checkpoint has no {key!r}: it is not a complete transformers CLIP/SigLIP state dict")
    return sd[key]


def _depth(sd: dict, tower: str) -> int:
    idx = {int(m[2]) for k in sd if (m := _LAYER.match(k)) and m[1] == tower}
    if not idx:
        raise WeightsError(f"the checkpoint has no {tower}.encoder.layers: not a transformers CLIP/SigLIP state dict")
    return max(idx) + 1


def _map_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every tensor to vitkit's names (shapes of the embeddings fixed by the callers)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, int, str], list] = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue  # a buffer transformers recomputes
        if m := _LAYER.match(k):
            tower, idx, rest = _TOWER[m[1]], int(m[2]), m[3]
            name, _, kind = rest.rpartition(".")
            if name in _QKV:
                qkv.setdefault((tower, idx, kind), [None] * 3)[_QKV[name]] = v
            elif name in _BLOCK:
                out[f"{tower}.blocks.{idx}.{_BLOCK[name]}.{kind}"] = v
            else:
                out[k] = v  # unknown: the strict load reports it
        elif k in _TOP:
            out[_TOP[k]] = v
        else:
            out[k] = v
    for (tower, idx, kind), parts in qkv.items():
        if any(p is None for p in parts):
            raise WeightsError(f"{tower} layer {idx} has only some of its query/key/value {kind} tensors")
        out[f"{tower}.blocks.{idx}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


def _vision_args(sd: dict, cfg: dict, where: str) -> dict:
    patch = _need(sd, "vision_model.embeddings.patch_embedding.weight")
    width = patch.shape[0]
    fc1 = _need(sd, "vision_model.encoder.layers.0.mlp.fc1.weight")
    img = _pair(cfg["image_size"])
    return dict(
        model="vit_base_patch16_224", img_size=list(img), patch_size=int(patch.shape[-1]), in_chans=int(patch.shape[1]),
        embed_dim=int(width), depth=_depth(sd, "vision_model"), num_heads=int(cfg["num_attention_heads"]),
        mlp_ratio=_mlp_ratio(width, fc1.shape[0]), act_layer=_act(cfg["hidden_act"], where),
        norm_eps=float(cfg["layer_norm_eps"]), num_classes=0,
    )


def _text_args(sd: dict, cfg: dict, where: str) -> dict:
    tok = _need(sd, "text_model.embeddings.token_embedding.weight")
    pos = _need(sd, "text_model.embeddings.position_embedding.weight")
    fc1 = _need(sd, "text_model.encoder.layers.0.mlp.fc1.weight")
    width = tok.shape[1]
    return dict(
        vocab_size=int(tok.shape[0]), context_length=int(pos.shape[0]), width=int(width),
        depth=_depth(sd, "text_model"), num_heads=int(cfg["num_attention_heads"]),
        mlp_ratio=_mlp_ratio(width, fc1.shape[0]), act_layer=_act(cfg["hidden_act"], where),
        norm_eps=float(cfg["layer_norm_eps"]),
    )


def _check_grid(pos: torch.Tensor, image: dict, prefix: int) -> None:
    grid = [s // image["patch_size"] for s in image["img_size"]]
    if pos.shape[0] != grid[0] * grid[1] + prefix:
        raise ConfigError(
            f"the vision position embedding has {pos.shape[0]} rows but image_size {image['img_size']} / patch "
            f"{image['patch_size']} gives {grid[0] * grid[1]} patches (+{prefix}); the config's image_size is wrong"
        )


def _clip_bpe_tokenizer(text: dict) -> dict | None:
    # Checkpoints with CLIP's 49408-token vocabulary use CLIP's BPE, available offline through open_clip.
    if text["vocab_size"] != 49408:
        return None
    return {"kind": "clip_bpe", "context_length": text["context_length"]}


def convert_hf_clip(state_dict: dict[str, torch.Tensor], config: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """A transformers ``CLIPModel`` state dict and its config dict -> ``(model_args, state_dict)``.

    The vision tower becomes a pre-norm ViT with a class token (``post_layernorm`` on the pooled
    class token is the ViT's final norm), the text tower a causal :class:`~vitkit.text.TextTransformer`
    pooled at the end-of-text token (the largest id for configs with the legacy ``eos_token_id=2``,
    as transformers does).
    """
    vcfg = _sub_config(config, "vision", _CLIP_DEFAULTS)
    tcfg = _sub_config(config, "text", _CLIP_DEFAULTS)
    sd = dict(state_dict)
    image = _vision_args(sd, vcfg, "the vision config's")
    image.update(pre_norm=True, class_token=True, global_pool="token")
    text = _text_args(sd, tcfg, "the text config's")
    eos = tcfg["eos_token_id"]
    text.update(
        output_dim=int(_need(sd, "text_projection.weight").shape[0]), causal=True, proj_bias=False,
        pool="argmax" if eos == 2 else "eot", eot_id=None if eos == 2 else int(eos),
    )
    out = _map_keys(sd)
    cls = out.pop("vision_model.embeddings.class_embedding", None)
    if cls is None:
        raise WeightsError("the checkpoint has no vision_model.embeddings.class_embedding: not a CLIPModel state dict")
    out["visual.cls_token"] = cls.reshape(1, 1, -1)
    pos = out.pop("vision_model.embeddings.position_embedding.weight")
    _check_grid(pos, image, 1)
    out["visual.pos_embed"] = pos[None]
    out["text.positional_embedding"] = out.pop("text_model.embeddings.position_embedding.weight")
    out["logit_scale"] = _need(sd, "logit_scale").reshape(())
    args = dict(
        image=image, text=text, embed_dim=int(out["visual_proj.weight"].shape[0]), image_proj="linear",
        init_logit_scale=float(config.get("logit_scale_init_value", 2.6592)), init_logit_bias=None,
        max_logit_scale=math.log(100), tokenizer=_clip_bpe_tokenizer(text), mean=list(OPENAI_CLIP_MEAN),
        std=list(OPENAI_CLIP_STD),
    )
    return args, out


def convert_hf_siglip(state_dict: dict[str, torch.Tensor], config: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """A transformers ``SiglipModel`` state dict and its config dict -> ``(model_args, state_dict)``.

    The vision tower becomes a ViT without class token pooled by MAP (``head.probe`` is the
    latent query, the fused ``in_proj`` splits into ``q`` and ``kv``), the text tower a
    :class:`~vitkit.text.TextTransformer` without causal mask pooled at the last position with a
    biased projection. The logit scale is not clamped (transformers does not clamp it). The
    SentencePiece vocabulary is not part of the weights: ``tokenizer`` is None until one is set.
    """
    vcfg = _sub_config(config, "vision", _SIGLIP_DEFAULTS)
    tcfg = _sub_config(config, "text", _SIGLIP_DEFAULTS)
    if not vcfg.get("vision_use_head", True):
        raise ConfigError("this SiglipModel has vision_use_head=False: it has no image embedding to convert")
    sd = dict(state_dict)
    image = _vision_args(sd, vcfg, "the vision config's")
    image.update(class_token=False, global_pool="map")
    text = _text_args(sd, tcfg, "the text config's")
    text.update(output_dim=int(_need(sd, "text_model.head.weight").shape[0]), causal=False, pool="last",
                proj_bias=True)
    out = _map_keys(sd)
    pos = out.pop("vision_model.embeddings.position_embedding.weight")
    _check_grid(pos, image, 0)
    out["visual.pos_embed"] = pos[None]
    out["text.positional_embedding"] = out.pop("text_model.embeddings.position_embedding.weight")
    out["visual.attn_pool.latent"] = out.pop("vision_model.head.probe")
    d = image["embed_dim"]
    for kind in ("weight", "bias"):
        w = out.pop(f"vision_model.head.attention.in_proj_{kind}")
        out[f"visual.attn_pool.q.{kind}"], out[f"visual.attn_pool.kv.{kind}"] = w[:d], w[d:]
    out["logit_scale"] = _need(sd, "logit_scale").reshape(())
    out["logit_bias"] = _need(sd, "logit_bias").reshape(())
    if text["output_dim"] != d:
        raise ConfigError(f"the text head projects to {text['output_dim']} but the image embedding is {d} wide")
    args = dict(
        image=image, text=text, embed_dim=int(d), image_proj="none", init_logit_scale=math.log(10),
        init_logit_bias=-10.0, max_logit_scale=None, tokenizer=None, mean=list(SIGLIP_MEAN), std=list(SIGLIP_STD),
    )
    return args, out


__all__ = ["convert_hf_clip", "convert_hf_siglip"]
