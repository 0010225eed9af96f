"""Checkpoint interop: timm, Hugging Face transformers, official DINOv2, MAE and Vim -> vitkit.

Each source layout has a pure ``state_dict -> state_dict`` converter; ``load_weights``
detects the layout, converts, adapts to the model (grids, patch size, channels, heads)
and loads strictly. Reading and writing weight files is :mod:`vitkit.weights_io`.
"""

from .adapt import adapt_input_channels, adapt_to_model, resample_patch_kernel
from .dinov2 import convert_dinov2
from .hf import convert_hf
from .mae import convert_mae
from .timm import convert_timm
from .weights import LoadReport, detect_format, load_weights

__all__ = [
    "LoadReport", "adapt_input_channels", "adapt_to_model", "convert_dinov2", "convert_hf", "convert_mae",
    "convert_timm", "detect_format", "load_weights", "resample_patch_kernel",
]
