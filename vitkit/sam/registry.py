"""SAM variants by name: ``create_sam("sam_vit_b")``, ``list_sam_models()``, ``SAM_CONFIGS``.

A variant is a flat dict of :func:`build_sam` arguments; ``create_sam`` applies overrides to it,
and every built model records the dict it came from as ``model.model_args``.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch

from ..errors import ConfigError
from .decoder import MaskDecoder, TwoWayTransformer
from .model import SAM_PIXEL_MEAN, SAM_PIXEL_STD, Sam, SamImageEncoder
from .prompt import PromptEncoder

# Every build_sam argument with its default (the paper's decoder; the image encoder of ViT-B).
SAM_DEFAULTS: dict = dict(
    img_size=1024, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, window_size=14,
    global_attn_indexes=[2, 5, 8, 11], drop_path_rate=0.0, prompt_dim=256, mask_in_chans=16, decoder_depth=2,
    decoder_mlp_dim=2048, decoder_heads=8, decoder_norm_eps=1e-5, num_multimask_outputs=3, iou_head_depth=3,
    iou_head_hidden_dim=256, pixel_mean=list(SAM_PIXEL_MEAN), pixel_std=list(SAM_PIXEL_STD),
)

# The paper's three image encoders (1024 px, patch 16, window 14, global blocks at the end of
# each quarter) share the prompt encoder and decoder (width 256, MLP 2048, 8 heads).
SAM_CONFIGS: dict[str, dict] = {
    "sam_vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "sam_vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "sam_vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=[7, 15, 23, 31]),
    # Trains on a CPU: 128 px, patch 8 (a 16x16 embedding, 64x64 low-res masks).
    "sam_nano": dict(img_size=128, patch_size=8, embed_dim=192, depth=6, num_heads=3, window_size=8,
                     global_attn_indexes=[2, 5], prompt_dim=128, decoder_mlp_dim=512, decoder_heads=4,
                     iou_head_hidden_dim=128),
    # For tests: 64 px, an 8x8 embedding.
    "sam_test": dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
                     global_attn_indexes=[1], prompt_dim=32, decoder_mlp_dim=64, decoder_heads=2,
                     iou_head_hidden_dim=32),
}


def list_sam_models(pattern: str = "*") -> list[str]:
    """Registered SAM variant names matching a shell-style pattern, sorted."""
    return sorted(n for n in SAM_CONFIGS if fnmatch.fnmatch(n, pattern))


def sam_model_args(name: str, **overrides) -> dict:
    """The full :func:`build_sam` arguments of variant ``name`` with ``overrides`` applied."""
    if name not in SAM_CONFIGS:
        close = difflib.get_close_matches(name, list(SAM_CONFIGS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown SAM model {name!r}{hint} (choose from {', '.join(list_sam_models())})")
    unknown = sorted(set(overrides) - set(SAM_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown SAM argument(s) {unknown}; valid: {', '.join(sorted(SAM_DEFAULTS))}")
    args = copy.deepcopy(SAM_DEFAULTS)
    args.update(copy.deepcopy(SAM_CONFIGS[name]))
    args.update(overrides)
    args["name"] = name
    return args


def build_sam(model_args: dict) -> Sam:
    """The :class:`Sam` that ``model_args`` (a ``Sam.model_args`` dict; missing keys take
    ``SAM_DEFAULTS``) describes, freshly initialised."""
    unknown = sorted(set(model_args) - set(SAM_DEFAULTS) - {"name"})
    if unknown:
        raise ConfigError(f"unknown SAM argument(s) {unknown}; valid: {', '.join(sorted(SAM_DEFAULTS))}")
    a = dict(SAM_DEFAULTS, **model_args)
    img, patch = int(a["img_size"]), int(a["patch_size"])
    if img % patch:
        raise ConfigError(f"img_size {img} must be a multiple of patch_size {patch}")
    grid = img // patch
    try:
        encoder = SamImageEncoder(
            img_size=img, patch_size=patch, embed_dim=a["embed_dim"], depth=a["depth"], num_heads=a["num_heads"],
            mlp_ratio=a["mlp_ratio"], out_chans=a["prompt_dim"], window_size=a["window_size"],
            global_attn_indexes=tuple(a["global_attn_indexes"]), drop_path_rate=a["drop_path_rate"],
        )
        prompt = PromptEncoder(a["prompt_dim"], (grid, grid), (img, img), a["mask_in_chans"])
        decoder = MaskDecoder(
            a["prompt_dim"],
            TwoWayTransformer(a["decoder_depth"], a["prompt_dim"], a["decoder_heads"], a["decoder_mlp_dim"],
                              norm_eps=a["decoder_norm_eps"]),
            num_multimask_outputs=a["num_multimask_outputs"], iou_head_depth=a["iou_head_depth"],
            iou_head_hidden_dim=a["iou_head_hidden_dim"],
        )
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"bad SAM arguments: {e}") from None
    return Sam(encoder, prompt, decoder, img, a["pixel_mean"], a["pixel_std"], model_name=a.get("name") or "sam")


def create_sam(name: str, **overrides) -> Sam:
    """Build SAM variant ``name`` (see :func:`list_sam_models`) with any :data:`SAM_DEFAULTS`
    argument overridden, freshly initialised."""
    return build_sam(sam_model_args(name, **overrides))


__all__ = ["SAM_CONFIGS", "SAM_DEFAULTS", "build_sam", "create_sam", "list_sam_models", "sam_model_args"]
