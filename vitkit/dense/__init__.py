"""Dense prediction: a backbone plus a registered head mapping images to per-pixel outputs
(segmentation logits or depth)."""

from .registry import head_entry, list_heads, register_head

__all__ = ["head_entry", "list_heads", "register_head"]
