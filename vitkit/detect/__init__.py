"""Object detection: detectors built on vitkit backbones, their matching, losses and COCO evaluation.

A detector is a :class:`Detector` registered by name (``model.head=<name>``, backbone ``model.name``):
``forward(images, pixel_mask)`` gives its raw outputs, ``loss(outputs, targets)`` its training
loss and ``postprocess(outputs, sizes)`` boxes in pixels, scores and labels.
"""

from .base import Detector
from .criterion import SetCriterion
from .evaluate import CocoEvaluator
from .matcher import HungarianMatcher
from .postprocess import set_postprocess
from .registry import create_detector, detector_entry, list_detectors, register_detector

__all__ = ["CocoEvaluator", "Detector", "HungarianMatcher", "SetCriterion", "create_detector", "detector_entry",
           "list_detectors", "register_detector", "set_postprocess"]
