"""Instance masks for promptable segmentation: COCO masks, instance-index PNGs and the built-in scenes.

:func:`vitkit.data.prepare_data` with ``task="promptable"`` opens both splits of

- the built-in ``scenes[:N]`` (its ``promptable`` task: the visible shapes' masks);
- a COCO JSON with ``segmentation`` (polygons, uncompressed or compressed RLE; decoded by
  :mod:`.coco_masks`), a file or a folder laid out as for detection; crowd annotations are
  left out, as the detection reader does;
- a folder with ``images/`` and ``instances/``: PNGs of the same stem where value ``k > 0``
  is instance ``k`` and 0 is background (one class, ``object``).

``ds.load(i)`` gives ``(PIL image, {"instance_masks": bool (K, H, W), "labels": int64 (K,)}, bad_files)``:
an unreadable image or instance PNG is replaced by a readable one and named in ``bad_files``.
:class:`InstanceTransform` resizes the longest side to the model's ``img_size`` and pads
bottom/right as SAM's preprocessing does (the masks with it, nearest neighbour); a batch keeps
``instance_masks`` and ``labels`` as per-sample lists (the detection collate: K differs between
images) and stacks ``input_size`` (B, 2), the unpadded (h, w) of each image.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DataError, PathNotFoundError
from .coco_masks import segmentation_mask
from .dense import _builtin
from .dense_formats import _files, dataset_root, subfolders
from .det_formats import _image_dir, find_detection_layout
from .images import IMAGE_EXTENSIONS, BadImageError, decode_image
from .inspect import DatasetInfo
from .skips import SkipCounter, first_readable
from .splits import check_split

INSTANCE_LAYOUTS = ("a COCO JSON with 'segmentation' (polygons or RLE), images/ + instances/ PNGs (value k > 0 is "
                    "instance k), or the built-in scenes")


class InstanceDataset(torch.utils.data.Dataset):
    """Images with instance masks read from files: ``items`` are ``(image path, reader)`` pairs where
    ``reader(h, w) -> (masks bool (K, h, w), labels (K,))``."""

    task = "promptable"

    def __init__(self, items: list, classes: list[str], format: str, in_chans: int = 3):
        self.items, self.classes, self.format, self.in_chans = items, list(classes), format, in_chans
        self.num_classes = len(self.classes)
        self.skips = SkipCounter()
        self.bad_files: list[str] = []

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int):
        """``(image, target, bad_files)``: item ``i`` or, if its image or instance PNG cannot be read, a
        readable stand-in (the broken files are named in ``bad_files`` and counted by the loader)."""
        def read(idx: int):
            path, reader = self.items[idx]
            img = decode_image(str(path), 3, name=str(path))
            masks, labels = reader(img.height, img.width)
            return img, {"instance_masks": masks, "labels": labels}

        (img, target), bad = first_readable(i, len(self.items), read, f"files of the {self.format} instance data")
        return img, target, bad

    def __getitem__(self, i: int):
        img, target, bad = self.load(i)
        self.skips.add(1, bad)
        return img, target

    def __repr__(self) -> str:
        return f"InstanceDataset(format={self.format!r}, n={len(self)})"


class SceneInstances:
    """The built-in scenes with only their instance masks and labels as the target."""

    task = "promptable"

    def __init__(self, scenes):
        self.scenes, self.classes, self.format = scenes, list(scenes.classes), "scenes"
        self.num_classes, self.in_chans = len(self.classes), scenes.in_chans
        self.skips, self.bad_files = scenes.skips, []

    def __len__(self) -> int:
        return len(self.scenes)

    def load(self, i: int):
        out = self.scenes.render(i)
        img = Image.fromarray(out["image"], "RGB")
        return img, {"instance_masks": out["instance_masks"], "labels": out["labels"]}, []

    def __getitem__(self, i: int):
        img, target, _ = self.load(i)
        return img, target


def _coco_reader(anns: list, index: dict[int, int]):
    def read(h: int, w: int):
        masks = [segmentation_mask(a["segmentation"], h, w) for a in anns]
        masks = np.stack(masks) if masks else np.zeros((0, h, w), bool)
        return masks, np.asarray([index[a["category_id"]] + 1 for a in anns], np.int64)
    return read


def _png_reader(path: str):
    def read(h: int, w: int):
        try:
            with Image.open(path) as png:
                ids = np.asarray(png)
        except (OSError, ValueError, SyntaxError, EOFError) as e:  # missing, truncated or not a PNG
            raise BadImageError(f"{path}: {type(e).__name__}: {e}") from None
        if ids.ndim != 2 or ids.shape != (h, w):
            raise BadImageError(f"{path}: an instance PNG must be one channel of the image's size {h}x{w}, "
                                f"got shape {ids.shape}")
        keys = [k for k in np.unique(ids) if k > 0]
        masks = np.stack([ids == k for k in keys]) if keys else np.zeros((0, h, w), bool)
        return masks, np.ones(len(keys), np.int64)
    return read


def _read_coco_masks(json_path: str, root: str):
    try:
        with open(json_path, encoding="utf-8") as f:
            d = json.load(f)
        cats = sorted(c["id"] for c in d.get("categories") or [])
        names = {c["id"]: str(c.get("name", c["id"])) for c in d.get("categories") or []}
        images = d["images"]
        folder = _image_dir(root, json_path, [str(im.get("file_name", "")) for im in images])
        index = {c: i for i, c in enumerate(cats)}
        anns: dict = {}
        for a in d.get("annotations") or []:
            if not a.get("iscrowd", 0) and a.get("segmentation") and a.get("category_id") in index:
                anns.setdefault(a["image_id"], []).append(a)
        items = [(os.path.join(folder, str(im["file_name"])), _coco_reader(anns.get(im["id"], []), index))
                 for im in images if os.path.isfile(os.path.join(folder, str(im["file_name"])))]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{json_path}: cannot read the COCO masks ({type(e).__name__}: {e}); images need 'id' and "
                        "'file_name', annotations 'image_id', 'category_id' and 'segmentation'") from None
    return items, [names[c] for c in cats]


def _seeded(items: list, split: str, val_fraction: float, seed: int) -> list:
    order = np.random.default_rng(seed).permutation(len(items)).tolist()
    k = min(max(1, int(round(val_fraction * len(items)))), max(len(items) - 1, 0))
    chosen = sorted(order[:k]) if split == "val" else sorted(order[k:])
    return [items[j] for j in chosen]


def build_instance_dataset(path: str, split: str = "train", *, val_fraction: float = 0.1, seed: int = 0,
                           in_chans: int = 3):
    """The ``split`` of the instance-mask data at ``path`` (see the module notes).

    Raises:
        PathNotFoundError: nothing at ``path``.
        DataError: no instance masks there, or no images in the split.
    """
    check_split(split, val_fraction)
    path = str(path)
    if path.partition(":")[0] == "scenes" and not os.path.exists(path):
        return SceneInstances(_builtin(path, "promptable", split, seed, 3))
    if not os.path.exists(path):
        raise PathNotFoundError(f"no such file or folder: {path!r}; check the path")
    root = dataset_root(path) if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    dirs = subfolders(root) if os.path.isdir(path) else {}
    if "images" in dirs and "instances" in dirs:
        images = _files(os.path.join(root, dirs["images"]), IMAGE_EXTENSIONS)
        pngs = _files(os.path.join(root, dirs["instances"]), (".png",))
        items = [(images[s], _png_reader(pngs[s])) for s in sorted(set(images) & set(pngs))]
        if not items:
            raise DataError(f"{path}: images/ and instances/ share no file stem; name each instance PNG as its image")
        return InstanceDataset(_seeded(items, split, val_fraction, seed), ["object"], "instance-png", in_chans)
    layout = find_detection_layout(path)
    if layout is None or layout.format != "coco":
        raise DataError(f"{path}: no instance masks found; the layouts read are {INSTANCE_LAYOUTS}")
    if split in layout.coco:
        items, classes = _read_coco_masks(layout.coco[split], layout.root)
    else:
        items, classes = _read_coco_masks(next(iter(layout.coco.values())), layout.root)
        items = _seeded(items, split, val_fraction, seed)
    if not items:
        raise DataError(f"{path}: the {split} split of the COCO masks holds no images with a file")
    return InstanceDataset(items, classes, "coco", in_chans)


def open_instances(path: str, *, val_fraction: float = 0.1, seed: int = 0, in_chans: int | None = None):
    """Both splits of instance-mask data and their description: ``(train, val, info, reason)``.

    :func:`vitkit.data.prepare_data` with ``task="promptable"`` calls this and returns a ``DataStage``.
    """
    if in_chans not in (None, 3):
        raise ConfigError(f"promptable segmentation reads RGB images; data.in_chans={in_chans} is not supported")
    train, val = (build_instance_dataset(path, s, val_fraction=val_fraction, seed=seed) for s in ("train", "val"))
    img, _, _ = train.load(0)
    info = DatasetInfo(num_classes=train.num_classes, in_chans=3, typical_size=(img.height, img.width),
                       n_train=len(train), n_val=len(val), format=train.format, classes=tuple(train.classes),
                       task="promptable")
    return train, val, info, f"instance masks in {path} ({train.format})"


def fit_longest_side(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) scaled so the longest side is ``size``, rounded as SAM's ``ResizeLongestSide``."""
    scale = size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


class InstanceTransform:
    """(PIL image, instance target, rng) -> ``{"image" uint8 (3, S, S), "instance_masks" bool (K, S, S),
    "labels" (K,), "input_size" (2,)}``: the longest side resized to ``size`` (bilinear; masks
    nearest), padded bottom/right with zeros; ``hflip`` is the flip probability (training).
    Instances left with no pixel are dropped."""

    def __init__(self, size: int, hflip: float = 0.0):
        self.size, self.hflip = size, hflip

    def __call__(self, img: Image.Image, target: dict, rng: random.Random | None = None) -> dict:
        img = img.convert("RGB")
        h, w = fit_longest_side(img.height, img.width, self.size)
        masks = np.asarray(target["instance_masks"], bool)
        labels = np.asarray(target["labels"], np.int64)
        img = img.resize((w, h), Image.BILINEAR)
        if masks.shape[1:] != (h, w):
            masks = np.stack([np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST)) for m in masks]) \
                if len(masks) else np.zeros((0, h, w), bool)
        if rng is not None and self.hflip > 0 and rng.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            masks = masks[:, :, ::-1]
        keep = masks.reshape(len(masks), -1).any(1) if len(masks) else np.zeros(0, bool)
        masks, labels = masks[keep], labels[keep]
        s = self.size
        image = torch.zeros(3, s, s, dtype=torch.uint8)
        image[:, :h, :w] = torch.from_numpy(np.asarray(img, np.uint8).copy()).permute(2, 0, 1)
        out_masks = torch.zeros(len(masks), s, s, dtype=torch.bool)
        out_masks[:, :h, :w] = torch.from_numpy(np.ascontiguousarray(masks))
        return {"image": image, "instance_masks": out_masks, "labels": torch.from_numpy(labels),
                "input_size": torch.tensor([h, w])}

    def __repr__(self) -> str:
        return f"InstanceTransform(size={self.size}, hflip={self.hflip})"
