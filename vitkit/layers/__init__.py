"""Building blocks for vision transformers, one concept per file."""

from .act import QuickGELU, get_act_layer
from .attention import Attention, AttentionCore
from .attn_pool import AttentionPoolLatent
from .block import Block
from .capture import capture_attention, record_attention
from .drop import DropPath
from .grn import GlobalResponseNorm
from .layer_scale import LayerScale
from .linear_attention import LinearAttention
from .mlp import Mlp, SwiGLU
from .moe import MoEMlp
from .norm import LayerNorm, LayerNorm2d, RMSNorm, get_norm_layer
from .patch_embed import PatchEmbed
from .performer import PerformerAttention
from .pos_embed import resample_abs_pos_embed, sincos_2d_pos_embed
from .pyramid import simple_pyramid
from .rel_pos import relative_position_index
from .rope import RotaryEmbedding2D, apply_rope
from .same_pad import MaxPool2dSame, pad_same
from .std_conv import StdConv2dSame
from .tokens import TokenContext

__all__ = [
    "Attention", "AttentionCore", "AttentionPoolLatent", "Block", "DropPath", "GlobalResponseNorm", "LayerNorm", "LayerNorm2d", "LayerScale",
    "LinearAttention", "MaxPool2dSame", "Mlp", "MoEMlp", "PatchEmbed", "PerformerAttention", "QuickGELU", "RMSNorm",
    "RotaryEmbedding2D", "StdConv2dSame", "SwiGLU", "TokenContext", "apply_rope",
    "capture_attention", "get_act_layer", "get_norm_layer", "pad_same", "record_attention", "relative_position_index",
    "resample_abs_pos_embed", "simple_pyramid", "sincos_2d_pos_embed",
]
