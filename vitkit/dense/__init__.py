"""Dense prediction: a backbone plus a registered head mapping images to per-pixel outputs
(segmentation logits or depth)."""

from .infer import dense_predict
from .model import DenseModel, create_dense_model
from .registry import head_entry, list_heads, register_head

__all__ = ["DenseModel", "create_dense_model", "dense_predict", "head_entry", "list_heads", "register_head"]
