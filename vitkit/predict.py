"""`predict(source, images)`: class probabilities for images, from a run dir, a weights file or any
source :func:`vitkit.load_model` accepts.

>>> from vitkit.predict import predict
>>> predict("runs/my-run", ["cat.jpg"], topk=3)
[{'path': 'cat.jpg', 'top': [{'label': 'cat', 'prob': 0.91}, ...]}]
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from .data.images import read_image
from .errors import ConfigError, PathNotFoundError
from .source import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model", "predict", "read_image"]


def predict(
    source: str | os.PathLike | LoadedModel,
    images: list[str | os.PathLike | Image.Image],
    *,
    topk: int = 5,
    batch_size: int = 64,
) -> list[dict]:
    """Top-``topk`` class probabilities for each image.

    Args:
        source: anything :func:`vitkit.load_model` accepts, or a
            :class:`LoadedModel` to reuse across calls.
        images: file paths or PIL images.
        topk: how many classes to return per image (at most the model's class count).

    Returns:
        ``[{"path": str or None, "top": [{"label": str, "prob": float}, ...]}, ...]`` in input
        order, most probable first. Labels are the class names the model was trained with,
        or class indices as strings when it carries none.
    """
    if topk < 1:
        raise ConfigError(f"topk must be >= 1, got {topk}")
    lm = source if isinstance(source, LoadedModel) else load_model(source)
    for image in images:
        if not isinstance(image, Image.Image) and not Path(image).is_file():
            raise PathNotFoundError(f"no such file: image {image}")
    labels = lm.labels or tuple(str(i) for i in range(lm.num_classes))
    k = min(topk, lm.num_classes)
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = torch.stack([lm.transform(read_image(im, lm.in_chans)) for im in chunk])  # (B, C, H, W) uint8
        probs = lm.logits(batch).softmax(-1).cpu()  # (B, num_classes)
        top = probs.topk(k, dim=-1)
        for im, p, idx in zip(chunk, top.values.tolist(), top.indices.tolist()):
            path = (getattr(im, "filename", "") or None) if isinstance(im, Image.Image) else str(im)
            results.append({"path": path, "top": [{"label": labels[i], "prob": v} for i, v in zip(idx, p)]})
    return results
