"""open_clip checkpoints -> :class:`~vitkit.clip.TwoTower`: the arguments that build it and its state dict.

Two layouts are read, told apart by their keys:

- **OpenAI style** (OpenAI's CLIP and open_clip's own ViT towers): ``visual.conv1``,
  ``visual.class_embedding``, ``visual.transformer.resblocks.N.attn.in_proj_weight``,
  ``visual.proj``; the text tower at the top level (``token_embedding``, ``transformer.resblocks``,
  ``ln_final``, ``text_projection``) or under ``text.`` (open_clip's ``CustomTextCLIP``).
- **timm trunk** (SigLIP and the other ``timm_model_name`` configs built on a timm ViT):
  ``visual.trunk.*`` in timm's ViT names, ``visual.head.*`` for open_clip's projection, the text
  tower under ``text.``, and ``logit_bias``.

Sizes come from the tensors' shapes; what shapes cannot tell (heads, activation, norm epsilon,
pooling, causal mask) comes from open_clip's model config (``model_cfg`` in
``open_clip_config.json``, or one of open_clip's ``model_configs/*.json``). Without a config an
OpenAI-style checkpoint is read with the settings of OpenAI's released models (QuickGELU,
LayerNorm epsilon 1e-5, 64-wide heads, causal text with argmax pooling), as open_clip's
``build_model_from_openai_state_dict`` does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from ..errors import ConfigError, WeightsError
from .convert_hf import _mlp_ratio
from .model import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SIGLIP_MEAN, SIGLIP_STD

# Buffers and scalars some exports carry (OpenAI's TorchScript archives, older open_clip) that
# are not parameters of the model.
_IGNORED = ("input_resolution", "context_length", "vocab_size", "attn_mask", "text.attn_mask")
_STRIP = ("module.", "_orig_mod.")
# A registered ViT the image tower is created from; the conversion overrides all of its sizes.
IMAGE_BASE = "vit_base_patch16_224"
CLIP_BPE_VOCAB = 49408

# open_clip residual block -> vitkit Block.
_BLOCK = {
    "ln_1": "norm1",
    "ln_2": "norm2",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj": "attn.proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "ls_1.gamma": "ls1.gamma",
    "ls_2.gamma": "ls2.gamma",
}
_RESBLOCK = re.compile(r"^(?P<pre>.*?)transformer\.resblocks\.(?P<i>\d+)\.(?P<rest>.+)$")

# timm ViT trunks that open_clip configs name: what the shapes cannot tell. Sizes not listed
# fall back to timm's ViT defaults (64-wide heads, exact GELU).
_TIMM_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "so400m": 16, "huge": 16,
               "giant": 16, "giantopt": 16}
_TIMM_GELU_TANH = ("vit_base_patch32_siglip_256", "vit_giantopt_patch16_siglip_256",
                   "vit_giantopt_patch16_siglip_384")
# timm ViT parameter roots a vitkit VisionTransformer has under the same names.
_TIMM_ROOTS = ("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre", "blocks", "norm", "fc_norm",
               "attn_pool", "head")
# Features of open_clip towers whose parameters vitkit's towers do not have.
_UNSUPPORTED_VISION = ("attentional_pool", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                       "scale_attn", "scale_fc")
_UNSUPPORTED_TEXT = ("embed_cls", "hf_model_name", "qk_norm", "scaled_cosine_attn", "scale_heads",
                     "scale_attn_inner", "scale_attn", "scale_fc", "ls_init_value")


def model_cfg(config: Mapping | None) -> dict | None:
    """open_clip's model config from ``open_clip_config.json`` (``{"model_cfg": ...}``) or the model config itself."""
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise ConfigError(f"the open_clip config must be a dict (model_cfg), got {type(config).__name__}")
    cfg = dict(config.get("model_cfg", config))
    missing = [k for k in ("vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ConfigError(
            f"not an open_clip model config: no {' or '.join(missing)} (keys: {sorted(cfg)[:8]}); pass the "
            "'model_cfg' of open_clip_config.json or one of open_clip's model_configs/*.json"
        )
    return cfg


def open_clip_layout(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """``"openai"`` or ``"timm"`` for an open_clip state dict, None for anything else."""
    keys = set(state_dict)
    text = "token_embedding.weight" in keys or "text.token_embedding.weight" in keys
    if not text:
        return None
    if "visual.conv1.weight" in keys and "visual.class_embedding" in keys:
        return "openai"
    if any(k.startswith("visual.trunk.") for k in keys):
        return "timm"
    return None


def is_open_clip(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is in one of the open_clip layouts :func:`convert_open_clip` reads."""
    return open_clip_layout(_clean(state_dict)) is not None


def _clean(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {}
    for k, v in state_dict.items():
        for p in _STRIP:
            k = k.removeprefix(p)
        if k not in _IGNORED and isinstance(v, torch.Tensor):
            sd[k] = v
    return sd


def _count_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    if found != set(range(len(found))):
        raise WeightsError(f"the checkpoint's blocks under {prefix!r} are not numbered 0..N-1: {sorted(found)}")
    return len(found)


def _act(cfg_act: Mapping | None, quick_gelu: bool) -> str:
    """open_clip's activation: QuickGELU or GELU, with ``act_kwargs`` (``approximate="tanh"``: SigLIP 2)."""
    approximate = (cfg_act or {}).get("approximate", "none")
    if quick_gelu:
        return "quick_gelu"
    if approximate not in ("none", "tanh"):
        raise ConfigError(f"unsupported GELU approximate={approximate!r} in act_kwargs; open_clip uses 'none' or 'tanh'")
    return "gelu_tanh" if approximate == "tanh" else "gelu"


def _eps(cfg_norm: Mapping | None) -> float:
    # open_clip's LayerNorm is torch's, whose epsilon is 1e-5 unless norm_kwargs says otherwise.
    return float((cfg_norm or {}).get("eps", 1e-5))


def _check_unsupported(cfg: Mapping, names: tuple[str, ...], tower: str) -> None:
    used = [n for n in names if cfg.get(n)]
    if used:
        raise ConfigError(
            f"this open_clip {tower} tower uses {', '.join(used)}, which vitkit's {tower} tower does not have; "
            "only plain pre-norm transformer towers convert"
        )


def _rename_block(rest: str) -> str:
    for src, dst in _BLOCK.items():
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src):]
    raise WeightsError(f"unexpected open_clip block key {rest!r}: not a plain transformer block")


# ---------------------------------------------------------------------- image towers
def _openai_visual(sd: dict, vcfg: Mapping, quick_gelu: bool, out: dict) -> tuple[dict, int | None]:
    """OpenAI-style ``visual.*`` -> vitkit ViT (``visual.*``) and its args; returns (args, projection dim)."""
    if isinstance(vcfg.get("layers"), (list, tuple)):
        raise ConfigError("open_clip's ModifiedResNet image towers (RN50, ...) are not supported; only ViT towers")
    _check_unsupported(vcfg, _UNSUPPORTED_VISION, "image")
    conv = sd.pop("visual.conv1.weight")
    width, in_chans, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    depth = _count_blocks(sd, "visual.transformer.resblocks.")
    pos = sd.pop("visual.positional_embedding")
    size = vcfg.get("image_size")
    if size is None:
        grid = math.isqrt(pos.shape[0] - 1)
        if grid * grid != pos.shape[0] - 1:
            raise WeightsError(
                f"visual.positional_embedding has {pos.shape[0] - 1} patch rows, not a square grid: pass the "
                "open_clip config, whose vision_cfg.image_size gives the image size"
            )
        size = grid * patch
    img = (size, size) if isinstance(size, int) else tuple(size)
    if (img[0] // patch) * (img[1] // patch) + 1 != pos.shape[0]:
        raise WeightsError(
            f"visual.positional_embedding has {pos.shape[0]} rows but image_size {img} with patch {patch} "
            f"needs {(img[0] // patch) * (img[1] // patch) + 1}: the config does not match the weights"
        )
    head_width = int(vcfg.get("head_width", 64))
    if width % head_width:
        raise ConfigError(f"image width {width} is not divisible by vision_cfg.head_width {head_width}")
    hidden = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    pool = vcfg.get("pool_type", "tok")
    if pool not in ("tok", "avg"):
        raise ConfigError(f"vision_cfg.pool_type {pool!r} is not supported; 'tok' and 'avg' convert")
    pre_norm = not vcfg.get("no_ln_pre", False)
    # 'tok' normalises then takes the class token (the order does not matter for a per-token
    # norm); 'avg' averages the patch tokens, normalised before or, with final_ln_after_pool, after.
    after_pool = pool == "avg" and bool(vcfg.get("final_ln_after_pool", False))
    args = dict(
        img_size=list(img) if img[0] != img[1] else img[0], patch_size=patch, in_chans=in_chans,
        embed_dim=width, depth=depth, num_heads=width // head_width, mlp_ratio=_mlp_ratio(width, hidden),
        qkv_bias=True, class_token=True, pre_norm=pre_norm, global_pool="token" if pool == "tok" else "avg",
        fc_norm=after_pool, num_classes=0, act_layer=_act(vcfg.get("act_kwargs"), quick_gelu),
        norm_eps=_eps(vcfg.get("norm_kwargs")),
    )
    if "visual.transformer.resblocks.0.ls_1.gamma" in sd:
        args["init_values"] = float(vcfg.get("ls_init_value") or 1.0)
    out["visual.patch_embed.proj.weight"] = conv
    if not pre_norm:
        # vitkit's patch projection has a bias unless a pre-norm follows; CLIP's conv has none.
        out["visual.patch_embed.proj.bias"] = conv.new_zeros(width)
    out["visual.cls_token"] = sd.pop("visual.class_embedding").reshape(1, 1, width)
    out["visual.pos_embed"] = pos[None]
    for k in [k for k in sd if k.startswith("visual.")]:
        v = sd.pop(k)
        if k.startswith("visual.ln_pre."):
            out["visual.norm_pre." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("visual.ln_post."):
            out[("visual.fc_norm." if after_pool else "visual.norm.") + k.rsplit(".", 1)[1]] = v
        elif k == "visual.proj":
            out["visual_proj.weight"] = v.t().contiguous()  # x @ proj == Linear with weight proj.T
        elif (m := _RESBLOCK.match(k)) and m.group("pre") == "visual.":
            out[f"visual.blocks.{m.group('i')}.{_rename_block(m.group('rest'))}"] = v
        else:
            raise WeightsError(f"unexpected open_clip image-tower key {k!r}")
    return args, out["visual_proj.weight"].shape[0] if "visual_proj.weight" in out else None


def _timm_trunk_visual(sd: dict, vcfg: Mapping, out: dict) -> tuple[dict, str, int | None]:
    """``visual.trunk.*`` (a timm ViT) + ``visual.head.*`` -> vitkit ViT; returns (args, image_proj, out dim)."""
    name = str(vcfg.get("timm_model_name") or "")
    trunk = {k.removeprefix("visual.trunk."): sd.pop(k) for k in [k for k in sd if k.startswith("visual.trunk.")]}
    strange = sorted({k.split(".", 1)[0] for k in trunk} - set(_TIMM_ROOTS))
    if not name.startswith("vit_") or strange or "patch_embed.proj.weight" not in trunk:
        raise ConfigError(
            f"the timm image trunk {name or '(unnamed)'} is not a plain timm ViT"
            + (f" (it has {', '.join(strange)})" if strange else "")
            + "; vitkit converts open_clip's timm ViT trunks (SigLIP and the like)"
        )
    conv = trunk["patch_embed.proj.weight"]
    width, in_chans, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    depth = _count_blocks(trunk, "blocks.")
    hidden = trunk["blocks.0.mlp.fc1.weight"].shape[0]
    reg = trunk["reg_token"].shape[1] if "reg_token" in trunk else 0
    class_token = "cls_token" in trunk
    prefix = int(class_token) + reg
    # open_clip does not pass image_size to timm: the trunk is built at its own size, which its name ends with.
    suffix = re.search(r"_(\d+)$", name)
    sizes = [s for s in (vcfg.get("image_size"), int(suffix.group(1)) if suffix else None) if s is not None]
    img = grid = rows = None
    for size in sizes:
        img = (size, size) if isinstance(size, int) else tuple(size)
        grid = (img[0] // patch) * (img[1] // patch)
        rows = trunk["pos_embed"].shape[1] if "pos_embed" in trunk else grid
        if rows in (grid, grid + prefix):
            break
    else:
        raise WeightsError(
            f"cannot tell the image size of the timm trunk {name}: visual.trunk.pos_embed has {rows} rows, which "
            f"no image size the config or the name gives ({sizes}) yields with patch {patch}"
        )
    size_word = m.group(1) if (m := re.match(r"vit_([a-z0-9]+)_", name)) else ""
    heads = _TIMM_HEADS.get(size_word, max(width // 64, 1))
    pool = vcfg.get("timm_pool", "avg")
    pool = {"": "map" if "attn_pool.latent" in trunk else "token" if class_token else "avg"}.get(pool, pool)
    if pool not in ("token", "avg", "map"):
        raise ConfigError(f"vision_cfg.timm_pool {pool!r} is not supported; 'token', 'avg' and 'map' convert")
    args = dict(
        img_size=list(img) if img[0] != img[1] else img[0], patch_size=patch, in_chans=in_chans,
        embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=_mlp_ratio(width, hidden),
        qkv_bias="blocks.0.attn.qkv.bias" in trunk, class_token=class_token, reg_tokens=reg,
        no_embed_class=rows == grid and prefix > 0, pre_norm="norm_pre.weight" in trunk, global_pool=pool,
        fc_norm="fc_norm.weight" in trunk, final_norm="norm.weight" in trunk or "fc_norm.weight" in trunk,
        num_classes=0,
        act_layer="gelu_tanh" if name in _TIMM_GELU_TANH else "gelu", norm_eps=1e-6,
    )
    if "blocks.0.ls1.gamma" in trunk:
        args["init_values"] = 1e-5
    for k, v in trunk.items():
        out["visual." + k] = v
    proj = vcfg.get("timm_proj", "linear")
    head = {k.removeprefix("visual.head."): sd.pop(k) for k in [k for k in sd if k.startswith("visual.head.")]}
    if "head.weight" in trunk:
        # No open_clip projection: the trunk's own classifier maps to the embedding.
        args["num_classes"] = trunk["head.weight"].shape[0]
        return args, "none", args["num_classes"]
    if proj == "linear" and set(head) == {"proj.weight"}:
        out["visual_proj.weight"] = head["proj.weight"]
        return args, "linear", head["proj.weight"].shape[0]
    if head or proj not in ("none", "linear", None, ""):
        raise ConfigError(
            f"open_clip image head timm_proj={proj!r} with keys {sorted(head)} is not supported; 'none' and a "
            "bias-free 'linear' projection convert"
        )
    return args, "none", width


# ---------------------------------------------------------------------- text tower
def _text(sd: dict, tcfg: Mapping, quick_gelu: bool, defaults: bool, out: dict) -> dict:
    """open_clip text tower (top level or ``text.``) -> vitkit TextTransformer (``text.*``) and its args."""
    _check_unsupported(tcfg, _UNSUPPORTED_TEXT, "text")
    p = "text." if "text.token_embedding.weight" in sd else ""
    emb = sd.pop(p + "token_embedding.weight")
    pos = sd.pop(p + "positional_embedding")
    vocab, width = emb.shape
    depth = _count_blocks(sd, p + "transformer.resblocks.")
    hidden = sd[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    pool = tcfg.get("pool_type", "argmax")
    if pool not in ("argmax", "eos", "last", "first"):
        raise ConfigError(f"text_cfg.pool_type {pool!r} is not supported; 'argmax', 'eos', 'last' and 'first' convert")
    if tcfg.get("proj_type", "linear") == "none":
        raise ConfigError("text towers without a projection (text_cfg.proj_type 'none') are not supported")
    heads = width // 64 if defaults else int(tcfg.get("heads", 8))
    out["text.token_embedding.weight"] = emb
    out["text.positional_embedding"] = pos
    if p + "text_projection" in sd:  # a (width, dim) matrix applied as x @ P
        proj = sd.pop(p + "text_projection")
        out["text.proj.weight"] = proj.t().contiguous()
        proj_bias = False
    elif p + "text_projection.weight" in sd:
        out["text.proj.weight"] = sd.pop(p + "text_projection.weight")
        proj_bias = p + "text_projection.bias" in sd
        if proj_bias:
            out["text.proj.bias"] = sd.pop(p + "text_projection.bias")
    else:
        raise WeightsError("the checkpoint has no text_projection: not a CLIP text tower")
    for k in [k for k in sd if (k.startswith(p) if p else not k.startswith(("visual.", "logit_")))]:
        v = sd.pop(k)
        rest = k[len(p):]
        if rest.startswith("ln_final."):
            out["text.norm." + rest.rsplit(".", 1)[1]] = v
        elif (m := _RESBLOCK.match(rest)) and m.group("pre") == "":
            out[f"text.blocks.{m.group('i')}.{_rename_block(m.group('rest'))}"] = v
        else:
            raise WeightsError(f"unexpected open_clip text-tower key {k!r}")
    args = dict(
        vocab_size=vocab, context_length=pos.shape[0], width=width, depth=depth, num_heads=heads,
        mlp_ratio=_mlp_ratio(width, hidden), output_dim=out["text.proj.weight"].shape[0],
        act_layer=_act(tcfg.get("act_kwargs"), quick_gelu), norm_eps=_eps(tcfg.get("norm_kwargs")),
        causal=not tcfg.get("no_causal_mask", False), pool="eot" if pool == "eos" else pool,
        eot_id=int(tcfg.get("eos_id", 2)) if pool == "eos" else None, proj_bias=proj_bias,
        pad_id=int(tcfg.get("pad_id", 0)), qkv_bias=True,
    )
    return args


def _tokenizer(tcfg: Mapping, context_length: int, vocab_size: int) -> dict | None:
    """The vitkit tokenizer config for an open_clip text config (None when vitkit has none for it)."""
    name = tcfg.get("hf_tokenizer_name")
    if not name:
        # open_clip's default tokenizer is CLIP's BPE, whose ids need its 49408-token vocabulary.
        return {"kind": "clip_bpe", "context_length": context_length} if vocab_size == CLIP_BPE_VOCAB else None
    # SigLIP's SentencePiece vocabulary lives in the checkpoint's hub repo (``spiece.model``); the
    # loader points ``model_path`` at a copy beside the weights when there is one.
    # open_clip's "canonicalize" cleaning lowercases and strips punctuation, as HF's SiglipTokenizer.
    canon = (tcfg.get("tokenizer_kwargs") or {}).get("clean") == "canonicalize"
    return {"kind": "sentencepiece", "model_path": None, "context_length": context_length, "lowercase": canon,
            "canonicalize": canon, "source": f"the hub repo {name} (spiece.model)"}


def _normalisation(preprocess: Mapping, timm_name: str) -> tuple[list[float], list[float]]:
    """The image mean and std: the config's ``preprocess_cfg``, else open_clip's defaults (SigLIP's for its trunks)."""
    siglip = "siglip" in timm_name
    mean = preprocess.get("mean") or (SIGLIP_MEAN if siglip else OPENAI_CLIP_MEAN)
    std = preprocess.get("std") or (SIGLIP_STD if siglip else OPENAI_CLIP_STD)
    return [float(m) for m in mean], [float(s) for s in std]


# ---------------------------------------------------------------------- entry point
def convert_open_clip(
    state_dict: Mapping[str, torch.Tensor], config: Mapping | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(model_args, state_dict)`` for a :class:`~vitkit.clip.TwoTower` from an open_clip checkpoint.

    Args:
        state_dict: an open_clip ``CLIP`` / ``CustomTextCLIP`` state dict (OpenAI-style or timm-trunk
            layout; ``module.`` prefixes and non-parameter buffers are dropped).
        config: open_clip's config: the contents of ``open_clip_config.json`` (its ``preprocess_cfg``
            gives the image normalisation) or its ``model_cfg`` alone (a ``model_configs/*.json``).
            Optional for OpenAI-style checkpoints (then read with OpenAI's settings), required for
            timm trunks (their heads and activation are named there).
    Returns:
        ``model_args`` (``vitkit.clip.build_two_tower(model_args)`` builds the model) and the state
        dict that model loads strictly. The converted model does not clamp the temperature
        (``max_logit_scale=None``): released models may sit above CLIP's training clamp, and the
        conversion must give the checkpoint's logits.
    """
    sd = _clean(state_dict)
    layout = open_clip_layout(sd)
    if layout is None:
        raise WeightsError(
            "not an open_clip checkpoint: expected visual.conv1 + visual.class_embedding (OpenAI style) or "
            f"visual.trunk.* (timm trunk) with a text tower; first keys: {sorted(sd)[:8]}"
        )
    cfg = model_cfg(config)
    if cfg is None and layout == "timm":
        raise ConfigError(
            "an open_clip checkpoint with a timm image trunk needs its model config (open_clip_config.json "
            "beside the weights, or pass config=): the trunk's heads and activation are named there"
        )
    defaults = cfg is None
    cfg = cfg or {}
    preprocess = dict((config or {}).get("preprocess_cfg") or {})
    vcfg, tcfg = dict(cfg.get("vision_cfg") or {}), dict(cfg.get("text_cfg") or {})
    quick_gelu = bool(cfg.get("quick_gelu", defaults))
    out: dict[str, torch.Tensor] = {}
    if layout == "openai":
        vision, proj_dim = _openai_visual(sd, vcfg, quick_gelu, out)
        image_proj = "linear" if proj_dim is not None else "none"
    else:
        vision, image_proj, proj_dim = _timm_trunk_visual(sd, vcfg, out)
    text = _text(sd, tcfg, quick_gelu, defaults, out)
    embed_dim = int(cfg.get("embed_dim", text["output_dim"]))
    if proj_dim not in (None, embed_dim) or text["output_dim"] != embed_dim:
        raise WeightsError(
            f"the towers' output sizes (image {proj_dim}, text {text['output_dim']}) differ from embed_dim {embed_dim}"
        )
    if "logit_scale" not in sd:
        raise WeightsError("the checkpoint has no logit_scale: not a CLIP model")
    out["logit_scale"] = sd.pop("logit_scale").reshape(())
    bias = sd.pop("logit_bias", None)
    if bias is not None:
        out["logit_bias"] = bias.reshape(())
    if sd:
        raise WeightsError(f"unexpected keys in the open_clip checkpoint: {sorted(sd)[:8]}")
    mean, std = _normalisation(preprocess, str(vcfg.get("timm_model_name") or ""))
    model_args = dict(
        # The image tower is built from a registered ViT whose every size argument is overridden.
        image={"model": IMAGE_BASE, **vision}, text=text, embed_dim=embed_dim, image_proj=image_proj,
        init_logit_scale=float(cfg.get("init_logit_scale", math.log(1 / 0.07))),
        init_logit_bias=float(cfg.get("init_logit_bias", -10.0)) if bias is not None else None,
        max_logit_scale=None, tokenizer=_tokenizer(tcfg, text["context_length"], text["vocab_size"]),
        mean=mean, std=std,
    )
    return model_args, out


__all__ = ["convert_open_clip", "is_open_clip", "model_cfg", "open_clip_layout"]
