"""Image-text data: images with one or more captions each, for contrastive (CLIP, SigLIP) training,
retrieval and captioning.

:func:`build_caption_dataset` reads

- a listing, ``.jsonl`` or ``.csv``, one row per image (or per caption: rows naming the same
  image are merged) with the image path (``image``, ``file``, ``path``, ``filename``, ``img``;
  relative to the listing's folder) and ``caption`` / ``text`` (one string) or ``captions``
  (a list; in a CSV cell a JSON list), plus an optional ``label`` / ``class`` on every row that
  gives ``classes`` for zero-shot evaluation;
- a folder holding such a listing (``train*`` and ``val*`` listings are used as the splits);
- WebDataset shards of ``key.jpg`` + ``key.txt`` (each non-empty line of the ``.txt`` a caption);
- the built-ins ``shapes-captions[:N]`` (the ``shapes`` images, each with five paraphrased
  captions naming its shape, colour and background; ``classes`` are the shape names) and
  ``scenes[:N]`` (the multi-shape scenes with their one caption).

Splits are by image and seeded: every caption of a validation image is in validation only.
``load(i)`` returns ``(PIL image, {"captions": list[str], "label": int | None, "image_id": int},
bad_files)``; :class:`CaptionTransform` turns that into the tensors and strings a batch holds.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DataError, PathNotFoundError
from .caption_listing import read_caption_listing
from .dataset import FileSource
from .dense import DenseDataset, _builtin
from .dense_formats import dataset_root
from .inspect import _GRAY_TOLERANCE, DatasetInfo, _sampled_images
from .scenes import ScenesDataset
from .shapes import CAPTION_TEMPLATES, DEFAULT_CLASSES, ShapesDataset, shape_captions
from .splits import check_split
from .task import CAPTION_LAYOUTS, caption_listings, caption_shards
from .transforms import EvalTransform, TrainTransform
from .webdataset import WebDatasetShards

_SCENE_SAMPLES = 64  # rendered scenes are alike: this many describe their captions


@dataclass
class CaptionInfo(DatasetInfo):
    """:class:`DatasetInfo` of image-text data: ``classes`` is None when the data names no classes;
    ``captions_per_image`` and ``caption_words`` are means over the sampled training images."""

    captions_per_image: float = 0.0
    caption_words: float = 0.0
    n_captions_train: int = 0
    n_captions_val: int = 0


_SIDED = re.compile(r"\b(left|right|lefthand|righthand)\b", re.IGNORECASE)


def captions_summary(caps: list[list[str]]) -> dict:
    """``captions_per_image`` and ``caption_words`` (means) and ``sided_captions`` (the share of captions
    that name a side, "left" or "right": a horizontal flip would make them wrong) of images' caption lists."""
    flat = [c for cs in caps for c in cs]
    return {"captions_per_image": float(np.mean([len(cs) for cs in caps])) if caps else 0.0,
            "caption_words": float(np.mean([len(c.split()) for c in flat])) if flat else 0.0,
            "sided_captions": float(np.mean([bool(_SIDED.search(c)) for c in flat])) if flat else 0.0}


class _Captioned:
    """What every caption dataset adds to its image dataset; ``captions_of(j)`` gives the
    captions of source item ``j``."""

    task = "caption"

    def captions_of(self, j: int) -> list[str]:
        raise NotImplementedError

    def all_captions(self) -> list[str]:
        """Every caption of this split (e.g. to train a tokenizer on)."""
        return [c for j in self.indices for c in self.captions_of(j)]

    def n_captions(self) -> int:
        return sum(len(self.captions_of(j)) for j in self.indices)

    def caption_stats(self, max_samples: int = 200, seed: int = 0) -> dict:
        pick = np.random.default_rng(seed).permutation(len(self))[:max_samples]
        return captions_summary([self.captions_of(self.indices[int(i)]) for i in pick])

    def stats(self, max_samples: int = 200, seed: int = 0) -> dict:
        """``{typical_size, in_chans, n, captions_per_image, caption_words, sided_captions}`` over up to
        ``max_samples`` images."""
        return {**super().stats(max_samples, seed), **self.caption_stats(max_samples, seed)}

    def describe(self) -> str:
        head = f"{self.format}: {len(self)} images, {self.n_captions()} captions"
        return "; ".join([head, *getattr(self, "notes", [])])


class CaptionSource(FileSource):
    """Image files with their captions (and, when the listing has them, class labels)."""

    def __init__(self, paths: list[str], captions: list[list[str]], labels: list[int] | None = None):
        super().__init__(paths)
        self.captions, self.labels = captions, labels

    def pair(self, j: int, in_chans: int) -> tuple[Image.Image, dict]:
        label = None if self.labels is None else int(self.labels[j])
        return self.image(j, in_chans), {"captions": list(self.captions[j]), "label": label, "image_id": j}


class CaptionDataset(_Captioned, DenseDataset):
    """Images with captions from a listing; an unreadable image is replaced by a seeded other one
    and named in ``bad_files`` (``load``), and ``exclude(names)`` leaves out images found broken
    before training. ``image_id`` is the image's row in the whole listing, the same in both splits."""

    def __init__(self, source: CaptionSource, *, classes: list[str] | None = None, indices=None, in_chans: int = 3,
                 format: str = "", max_bad_fraction: float = 0.05, notes: list[str] | None = None):
        super().__init__(source, task="caption", classes=classes or [], in_chans=in_chans, indices=indices,
                         format=format, max_bad_fraction=max_bad_fraction, notes=notes)
        self.classes = list(classes) if classes else None

    @property
    def labels(self) -> list[int] | None:
        return None if self.source.labels is None else [int(self.source.labels[j]) for j in self.indices]

    def captions_of(self, j: int) -> list[str]:
        return list(self.source.captions[j])

    def __repr__(self) -> str:
        return f"CaptionDataset(format={self.format!r}, n={len(self)}, captions={self.n_captions()})"


class ShapesCaptions(_Captioned, ShapesDataset):
    """The built-in ``shapes`` images (the same pixels as :class:`ShapesDataset` with the same
    seed) with ``captions_per_image`` paraphrases each, drawn per image from
    :data:`~vitkit.data.shapes.CAPTION_TEMPLATES` with a seeded generator of its own (so the
    pixels do not change). ``classes`` are the shape names, ``labels`` each image's shape."""

    def __init__(self, n: int = 10000, split: str = "train", img_size: int = 64, seed: int = 0,
                 classes: tuple[str, ...] = DEFAULT_CLASSES, in_chans: int = 3, captions_per_image: int = 5):
        if not 1 <= captions_per_image <= len(CAPTION_TEMPLATES):
            raise ConfigError(f"captions_per_image must be in 1..{len(CAPTION_TEMPLATES)}, got {captions_per_image}")
        super().__init__(n=n, split=split, img_size=img_size, seed=seed, classes=classes, in_chans=in_chans)
        self.format, self.captions_per_image, self.notes = "shapes-captions", captions_per_image, []

    @property
    def labels(self) -> list[int]:
        return list(self.targets)

    def _paraphrases(self, j: int, shape: str, colour: str, background: str) -> list[str]:
        rng = np.random.default_rng([self.source.seed, self.source.stream, j, 1])
        return shape_captions(shape, colour, background, rng, self.captions_per_image)

    def captions_of(self, j: int) -> list[str]:
        f = self.source.caption_fields(j)
        return self._paraphrases(j, f["shape"], f["colour"], f["background"])

    def n_captions(self) -> int:
        return len(self) * self.captions_per_image

    def load(self, i: int) -> tuple[Image.Image, dict, list[str]]:
        j = self.indices[i]
        out = self.source.render(j)
        img = Image.fromarray(out["image"], "RGB")
        captions = self._paraphrases(j, self.classes[out["label"]], out["colour"], out["background"])
        return (img if self.in_chans == 3 else img.convert("L"),
                {"captions": captions, "label": int(out["label"]), "image_id": int(j)}, [])


class SceneCaptions(_Captioned, ScenesDataset):
    """The built-in multi-shape scenes with their caption ("a red circle and two blue squares on a
    striped background"); no ``classes`` (an image holds several shapes)."""

    def __init__(self, n: int = 2000, split: str = "train", seed: int = 0, img_size: int = 128, in_chans: int = 3):
        super().__init__(n, split, seed, img_size, in_chans, task="caption")
        self.classes, self.num_classes, self.labels, self.notes = None, 0, None, []

    def captions_of(self, j: int) -> list[str]:
        return [self.source.render(j)["caption"]]

    def n_captions(self) -> int:
        return len(self)

    def caption_stats(self, max_samples: int = 200, seed: int = 0) -> dict:
        return super().caption_stats(min(max_samples, _SCENE_SAMPLES), seed)

    def load(self, i: int) -> tuple[Image.Image, dict, list[str]]:
        out = self.render(i)
        return self._pil(out["image"]), {"captions": [out["caption"]], "label": None,
                                         "image_id": int(self.indices[i])}, []


class CaptionShards(WebDatasetShards):
    """Image-text WebDataset shards (``key.jpg`` + ``key.txt``), streamed like
    :class:`~vitkit.data.webdataset.WebDatasetShards`; broken images are replaced as they are
    read (nothing is scanned up front, so ``exclude`` leaves nothing out)."""

    task = "caption"
    classes = None
    labels = None

    def __init__(self, shards: list[str], **kw):
        super().__init__(shards, captions=True, **kw)
        self.bad_files: list[str] = []
        self.notes: list[str] = []

    def exclude(self, names) -> CaptionShards:
        return self

    def all_captions(self) -> list[str]:
        return [c for s in self.shards for _, caps in self._samples_of(s) for c in caps]

    def n_captions(self) -> int:
        return len(self.all_captions())

    def caption_stats(self, max_samples: int = 200, seed: int = 0) -> dict:
        """Caption counts of the first ``max_samples`` samples in shard order."""
        return captions_summary([caps for s in self.shards for _, caps in self._samples_of(s)][:max_samples])

    def stats(self, max_samples: int = 200, seed: int = 0) -> dict:
        sizes = [img.size for img in _sampled_images(self, max_samples, seed)]
        size = (int(np.median([s[1] for s in sizes])), int(np.median([s[0] for s in sizes]))) if sizes else (0, 0)
        return {"typical_size": size, "in_chans": self.in_chans, "n": len(self), **self.caption_stats(max_samples)}

    def describe(self) -> str:
        return f"webdataset: {len(self)} images, {self.n_captions()} captions in {len(self.shards)} shards"


def _split_indices(n: int, split: str, val_fraction: float, seed: int) -> list[int]:
    order = np.random.default_rng(seed).permutation(n).tolist()
    k = min(max(1, int(round(val_fraction * n))), max(n - 1, 0))
    return sorted(order[:k]) if split == "val" else sorted(order[k:])


def _count(path: str, default: int) -> int:
    name, _, count = path.partition(":")
    try:
        n = int(count) if count else default
    except ValueError:
        n = 0
    if n <= 0:
        raise DataError(f"{path!r}: expected '{name}' or '{name}:N' with N a positive number of training images")
    return n


def _by_name(files: list[str], split: str) -> list[str] | None:
    """The files named for ``split`` (train*/val*) when both splits are named, else None."""
    named = {s: [f for f in files if os.path.basename(f).lower().startswith(s)] for s in ("train", "val")}
    return named[split] if named["train"] and named["val"] else None


def build_caption_dataset(path: str, split: str = "train", *, val_fraction: float = 0.1, seed: int = 0,
                          in_chans: int = 3, max_bad_fraction: float = 0.05):
    """Open the ``split`` ("train" | "val") of the image-text data at ``path`` (see the module notes).

    Data without its own split is split by image with a seeded fraction ``val_fraction``.

    Raises:
        PathNotFoundError: nothing at ``path``.
        DataError: no captions at ``path``, no usable rows, or too many bad rows.
        ConfigError: a bad ``split`` or ``val_fraction``.
    """
    check_split(split, val_fraction)
    path = str(path)
    name = path.partition(":")[0]
    if name == "shapes-captions" and not os.path.exists(path):
        n = _count(path, 10000)
        return ShapesCaptions(n if split == "train" else max(100, n // 5), split, seed=seed, in_chans=in_chans)
    if name == "scenes" and not os.path.exists(path):
        scenes = _builtin(path, "caption", split, seed, in_chans)  # parses scenes[:N] and sizes the split
        return SceneCaptions(len(scenes), split, seed=seed, img_size=scenes.img_size, in_chans=in_chans)
    if shards := caption_shards(path):
        kw = dict(seed=seed, in_chans=in_chans, max_bad_fraction=max_bad_fraction)
        if (named := _by_name(shards, split)) is not None:
            return CaptionShards(named, split=None, **kw)
        return CaptionShards(shards, split=split, val_fraction=val_fraction, **kw)
    if not os.path.exists(path):
        raise PathNotFoundError(f"no such file or folder: {path!r}; check the path (expected {CAPTION_LAYOUTS})")
    if os.path.isdir(path):
        listings = caption_listings(dataset_root(path))
        if not listings:
            raise DataError(f"{path}: no captions found; the layouts read are {CAPTION_LAYOUTS}")
        named = _by_name(listings, split)
        listing = named[0] if named else next((f for f in listings if "caption" in os.path.basename(f).lower()),
                                              listings[0])
    elif path.lower().endswith((".jsonl", ".csv")):
        listing, named = path, None
    else:
        raise DataError(f"{path}: not image-text data; expected {CAPTION_LAYOUTS}")
    files, captions, labels, classes, notes = read_caption_listing(listing, max_bad_fraction)
    indices = None if named else _split_indices(len(files), split, val_fraction, seed)
    if indices == []:
        raise DataError(f"{listing}: {len(files)} image(s) cannot be split into train and val; add images")
    fmt = "jsonl" if listing.lower().endswith(".jsonl") else "csv"
    return CaptionDataset(CaptionSource(files, captions, labels), classes=classes, indices=indices,
                          in_chans=in_chans, format=fmt, max_bad_fraction=max_bad_fraction, notes=list(notes))


def describe_captions(train, val, max_samples: int = 200, seed: int = 0, where: str = "the dataset") -> CaptionInfo:
    """Sizes and channels of up to ``max_samples`` sampled training images, caption counts of both
    splits; ``in_chans`` is 1 when every sampled image is gray."""
    hs, ws, gray = [], [], True
    for img in _sampled_images(train, max_samples, seed):
        hs.append(img.height)
        ws.append(img.width)
        if gray and img.mode != "L":
            a = np.asarray(img, dtype=np.int16)
            gray = bool(np.abs(a - a.mean(axis=2, keepdims=True)).max() <= _GRAY_TOLERANCE)
    if not hs:
        raise DataError(f"{where}: none of the sampled images could be read; check the image paths")
    caps = train.caption_stats(max_samples, seed)
    classes = tuple(train.classes) if train.classes else None
    return CaptionInfo(
        num_classes=len(classes or ()), in_chans=1 if gray else 3, typical_size=(int(np.median(hs)), int(np.median(ws))),
        n_train=len(train), n_val=len(val), format=train.format, classes=classes, task="caption",
        notes=tuple(getattr(train, "notes", ())), captions_per_image=caps["captions_per_image"],
        caption_words=caps["caption_words"], n_captions_train=train.n_captions(), n_captions_val=val.n_captions())


class CaptionTransform:
    """An image with its captions -> ``{"image": uint8 (C, size, size), "caption": str, "captions":
    list[str], "label": int (-1: none), "image_id": int}``.

    Training (``train=True``): a random resized crop with area in ``scale`` (aspect 3/4..4/3) and a
    horizontal flip with probability ``hflip`` (0 by default: captions may say left or right; the plan
    turns it on where they hardly do); the caption is one drawn with ``rng``.
    Evaluation: the shorter side resized to ``size`` and the centre cropped; the caption is the
    first. Both resample bicubic, as CLIP and open_clip do (``RandomResizedCrop(scale=(0.9, 1))``
    for training, ``Resize`` + ``CenterCrop`` for evaluation).
    """

    def __init__(self, size: int, *, train: bool, scale: tuple[float, float] = (0.9, 1.0), in_chans: int = 3,
                 interpolation: str = "bicubic", hflip: float = 0.0):
        self.size, self.train, self.scale, self.in_chans = int(size), bool(train), tuple(scale), in_chans
        self.hflip = float(hflip) if train else 0.0
        self._image = (TrainTransform(size, in_chans, scale=scale, hflip=self.hflip, interpolation=interpolation)
                       if train
                       else EvalTransform(size, in_chans, crop_pct=1.0, interpolation=interpolation))

    def __call__(self, img: Image.Image, target: dict, rng: random.Random | None = None) -> dict:
        rng = rng if rng is not None else random.Random()
        captions = list(target.get("captions") or ([target["caption"]] if target.get("caption") else []))
        if not captions:
            raise DataError(f"image {target.get('image_id', '?')} has no caption; every image-text sample needs one")
        image = self._image(img, rng)
        label = target.get("label")
        return {"image": image, "caption": rng.choice(captions) if self.train else captions[0], "captions": captions,
                "label": -1 if label is None else int(label), "image_id": int(target.get("image_id", -1))}

    def __repr__(self) -> str:
        return (f"CaptionTransform(size={self.size}, train={self.train}, scale={self.scale}, hflip={self.hflip}, "
                f"in_chans={self.in_chans})")


def collate_captions(samples: list[dict]) -> dict:
    """Batch :class:`CaptionTransform` samples: ``"image"`` (B, C, H, W) uint8, ``"caption"``
    list[str], ``"captions"`` list[list[str]], ``"label"`` and ``"image_id"`` (B,) int64."""
    return {"image": torch.stack([s["image"] for s in samples]),
            "caption": [s["caption"] for s in samples], "captions": [list(s["captions"]) for s in samples],
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "image_id": torch.tensor([s["image_id"] for s in samples], dtype=torch.long)}
