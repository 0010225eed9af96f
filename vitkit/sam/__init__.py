"""Promptable segmentation in the style of Segment Anything (Kirillov et al., 2023).

``create_sam("sam_vit_b")`` builds a model; ``Sam.preprocess`` / ``encode_image`` / ``decode`` /
``postprocess_masks`` run it; ``load_sam(path)`` reads vitkit, segment-anything and transformers
checkpoints.
"""

from .auto import generate_masks
from .convert import convert_hf_sam, convert_segment_anything, load_sam
from .decoder import MaskDecoder, TwoWayTransformer
from .model import SAM_PAPER, Sam, SamImageEncoder
from .predictor import SamPredictor
from .prompt import PositionEmbeddingRandom, PromptEncoder
from .registry import SAM_CONFIGS, SAM_DEFAULTS, build_sam, create_sam, list_sam_models, sam_model_args

__all__ = [
    "SAM_CONFIGS", "SAM_DEFAULTS", "SAM_PAPER", "MaskDecoder", "PositionEmbeddingRandom", "PromptEncoder", "Sam",
    "SamImageEncoder", "SamPredictor", "TwoWayTransformer", "build_sam", "convert_hf_sam", "convert_segment_anything",
    "create_sam", "generate_masks", "list_sam_models", "load_sam", "sam_model_args",
]
