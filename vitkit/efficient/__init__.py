"""Make models fast: token merging and pruning, reduced precision, compilation, benchmarking."""

from ..export.quantize import quantize_int8
from .compile import Compiled, compile_for_inference
from .precision import autocast, predict_logits
from .prune import apply_token_pruning, prune_tokens, remove_token_pruning
from .reduce import reduction_of, remove_reduction
from .tome import apply_tome, merge_tokens, remove_tome, tome_schedule

__all__ = [
    "Compiled", "apply_token_pruning", "apply_tome", "autocast", "compile_for_inference", "merge_tokens",
    "predict_logits", "prune_tokens", "quantize_int8", "reduction_of", "remove_reduction", "remove_token_pruning",
    "remove_tome", "tome_schedule",
]
