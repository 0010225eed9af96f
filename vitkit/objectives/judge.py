"""The judge of generated images: a classifier vitkit trained on the same data as the generator.

No Inception network is reachable offline, so sample quality is measured with a classifier
trained by ``vitkit train --data DIR`` on the generator's data (:func:`load_judge`):

- its pooled pre-logits (``forward_head(forward_features(x), pre_logits=True)``) are the feature
  space of the Frechet distance (:func:`vitkit.generate.metrics.frechet_distance`);
- its predictions give the class consistency of class-conditional samples
  (:func:`vitkit.generate.metrics.class_consistency`), whose ceiling is the classifier's own
  accuracy on real images (:attr:`Judge.test_acc`).

The judge sees a generated image exactly as it saw the real ones at evaluation: the [-1, 1]
sample is quantised to 8 bits (as a saved image is, and as the reference FID code scores
samples), then goes through the classifier's own evaluation transform (its size, channels,
interpolation) and normalisation. Real images scored through the judge therefore get the
accuracy ``vitkit eval`` reports. The judge is recorded by source and the sha256 of its
weights, as a distillation teacher is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from ..errors import ConfigError, DataError, PathNotFoundError, RunDirError
from ..generate.grid import to_uint8
from ..generate.load import generative_kind
from ..rundir import RunDir
from ..source import ArchitectureNeededError, LoadedModel, load_model
from .teacher import weights_sha256

_WHAT = ("the judge is a classifier trained on the generator's data: train one (vitkit train --data DIR --out RUN) and "
         "pass its run directory, or the model.safetensors vitkit wrote for it")


class Judge:
    """A frozen classifier that scores images in [-1, 1]: ``features, logits = judge(images)``.

    Attributes:
        source: what was loaded (a run directory or weights file), as given.
        sha256: the sha256 of its weights (:func:`vitkit.objectives.weights_sha256`).
        model_name: its architecture.
        test_acc: its accuracy on its run's validation split (for Fashion-MNIST's IDX files, the
            test set), from the run's ``summary.json``; None without a finished run.
        num_classes, num_features, labels: its classes and the width of its features.
        img_size, in_chans: the input it was trained on.
    """

    def __init__(self, loaded: LoadedModel, source: str, test_acc: float | None = None, batch_size: int = 256):
        self.loaded = loaded
        self.model = loaded.model.eval().requires_grad_(False)
        self.source = source
        self.sha256 = weights_sha256(self.model)
        self.model_name = getattr(self.model, "model_name", type(self.model).__name__)
        self.test_acc = test_acc
        self.num_classes = int(self.model.num_classes)
        self.num_features = int(self.model.num_features)
        self.labels = tuple(loaded.labels)
        self.in_chans = loaded.in_chans
        self.img_size = tuple(self.model.card.input_size[1:])
        self.batch_size = batch_size

    @property
    def reference(self) -> dict:
        """``{"source", "model", "sha256", "test_acc"}``: what a run or a benchmark records about its judge."""
        return {"source": self.source, "model": self.model_name, "sha256": self.sha256, "test_acc": self.test_acc}

    def check_classes(self, classes: int | Sequence[str]) -> None:
        """Raise ConfigError unless the generator's ``classes`` (a count or names) are the judge's."""
        n = classes if isinstance(classes, int) else len(classes)
        if n != self.num_classes:
            raise ConfigError(
                f"the judge {self.source} has {self.num_classes} classes but the generator {n}: {_WHAT}"
            )
        if not isinstance(classes, int) and self.labels and tuple(classes) != self.labels:
            raise ConfigError(
                f"the judge {self.source} was trained on classes {list(self.labels)[:5]}..., the generator on "
                f"{list(classes)[:5]}...: the class ids must mean the same; {_WHAT}"
            )

    @staticmethod
    def _check(images) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3) or not len(images):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise DataError(f"the judge takes images (B, C, H, W) in [-1, 1] with B >= 1 and C = 1 or 3; got {shape}")

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] (B, C, H, W) -> the classifier's normalised input (B, in_chans, *img_size) on its device."""
        self._check(images)
        pixels = to_uint8(images)  # (B, H, W, C)
        # The classifier's own evaluation transform: the pixels real images gave it at evaluation.
        x = torch.stack([self.loaded.transform(Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p))
                         for p in pixels])  # uint8 (B, in_chans, h, w)
        return self.loaded.normalize(x.to(self.loaded.device))

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images in [-1, 1] (B, C, H, W) -> (pooled pre-logits (B, num_features), logits (B, num_classes)),
        float32 on the CPU."""
        self._check(images)
        feats, logits = [], []
        for chunk in images.split(self.batch_size):
            tokens = self.model.forward_features(self.preprocess(chunk))
            feats.append(self.model.forward_head(tokens, pre_logits=True).float().cpu())
            out = self.model.forward_head(tokens)
            if isinstance(out, (tuple, list)):  # a distilled classifier: its prediction is the heads' average
                out = torch.stack(list(out)).mean(0)
            logits.append(out.float().cpu())
        return torch.cat(feats), torch.cat(logits)


def _test_acc(loaded: LoadedModel) -> float | None:
    """The run's final validation accuracy, when the judge is that run's final weights."""
    if loaded.run_dir is None:
        return None
    run = RunDir(loaded.run_dir)
    if loaded.weights is None or Path(loaded.weights).resolve() != run.final_weights.resolve():
        return None
    acc = run.read_summary().get("val_acc")
    return float(acc) if acc is not None else None


def load_judge(source: str | os.PathLike, device: str | torch.device | None = "cpu") -> Judge:
    """The classifier at ``source`` (a run directory, a checkpoint of one, or its ``model.safetensors``) as a Judge.

    Raises:
        PathNotFoundError: nothing at ``source``.
        ConfigError: ``source`` is not a classifier (a generative, dense, detection or image-text
            model, a backbone without a head, or weights without their architecture).
    """
    text = str(source)
    if not text:
        raise ConfigError(f"no judge given: {_WHAT}")
    path = Path(text).expanduser()
    if not path.exists():
        raise PathNotFoundError(f"judge {text!r}: no such run directory or weights file; {_WHAT}")
    kind = generative_kind(path)
    if kind is not None:
        raise ConfigError(f"judge {text} is a generative model ({kind}), not a classifier: {_WHAT}")
    try:
        loaded = load_model(path, device=device)
    except ArchitectureNeededError as e:
        raise ConfigError(f"judge {text} {e.what}: {_WHAT}") from None
    except (ConfigError, RunDirError) as e:
        raise ConfigError(f"judge {text}: {e}. {_WHAT}") from None
    name = getattr(loaded.model, "model_name", type(loaded.model).__name__)
    if loaded.task != "classify":
        raise ConfigError(f"judge {text} is a {loaded.task} model ({name}), not a classifier: {_WHAT}")
    if not getattr(loaded.model, "num_classes", 0):
        raise ConfigError(f"judge {text} ({name}) has no classifier head (num_classes=0): {_WHAT}")
    return Judge(loaded, text, _test_acc(loaded))


__all__ = ["Judge", "load_judge"]
