"""Training objectives: what a run optimises (see :class:`Objective`)."""

from .base import Objective
from .supervised import Supervised, topk_correct

__all__ = ["Objective", "Supervised", "topk_correct"]
