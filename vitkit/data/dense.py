"""Segmentation and depth datasets: images paired with a class-index mask or a depth map.

``build_dense_dataset`` opens a folder in one of the layouts of :mod:`.dense_formats` (or a
built-in: ``scenes[:N]``, ``depth-scenes[:N]``) and returns a :class:`DenseDataset` whose
``load(i)`` gives ``(image, {"mask": PIL "L"} | {"depth": float32 (H, W) metres}, bad_files)``.

Masks: index PNGs in mode L or P (a palette PNG is read as its indices, never as colours).
Every void value is read as :data:`IGNORE` (255), which is the dataset's ``ignore_index``:
``data.ignore_index`` when given, else the format's (VOC 255; ADE20K 0, its classes shifted down
by one), else, when ``classes.txt`` names N classes, every value >= N (CamVid's 11). A value that
is neither a class nor void makes the pair bad. Without ``classes.txt`` the classes are
0..the largest value in the masks, named ``class_i``. ``notes`` says which raw values were void.

Depth maps: 16-bit PNG in millimetres or ``.npy`` float metres; 0 (and anything not finite or
negative) is invalid and reads as 0.

A pair is bad when either side cannot be read, one side is missing, the sizes differ, or the
mask holds values outside the classes; :func:`vitkit.data.scan_files` finds them all before
training (the message names the pair and the reason) and the run leaves them out.
"""

from __future__ import annotations

import importlib
import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError, PathNotFoundError
from .dense_formats import DENSE_LAYOUTS, DEPTH_LAYOUTS, DenseLayout, find_depth_layout, find_segment_layout
from .images import BadImageError, decode_image
from .skips import SkipCounter, first_readable, leave_out
from .splits import check_split

IGNORE = 255
_MASK_MODES = ("L", "P", "1")


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadImageError(f"{path}: {e}") from None


def _open_raw(path: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(_read_bytes(path)))
        img.load()
    except BadImageError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure makes the file unusable
        raise BadImageError(f"{path}: {type(e).__name__}: {e}") from None
    return img


def read_mask_values(path: str) -> np.ndarray:
    """The raw class indices of an index-mask PNG (mode L or P) as uint8 (H, W)."""
    img = _open_raw(path)
    if img.mode not in _MASK_MODES:
        raise BadImageError(f"{path}: mask in mode {img.mode}, expected an index mask (mode L or P, one class id "
                            "per pixel); convert colour masks to class ids first")
    return np.asarray(img, dtype=np.uint8)


def read_depth(path: str) -> np.ndarray:
    """A depth map in metres (float32 (H, W), 0 = invalid) from a 16-bit PNG in mm or a .npy in metres."""
    if path.lower().endswith(".npy"):
        try:
            d = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise BadImageError(f"{path}: {type(e).__name__}: {e}") from None
        if d.ndim == 3 and 1 in (d.shape[0], d.shape[-1]):
            d = d.reshape(d.shape[1:] if d.shape[0] == 1 else d.shape[:-1])
        if d.ndim != 2 or not np.issubdtype(d.dtype, np.number):
            raise BadImageError(f"{path}: expected a 2-D array of depths in metres, got {d.dtype} {d.shape}")
        d = d.astype(np.float32)
    else:
        img = _open_raw(path)
        if not (img.mode.startswith("I;16") or img.mode == "I"):
            raise BadImageError(f"{path}: depth PNG in mode {img.mode}, expected 16-bit (millimetres)")
        d = np.asarray(img, dtype=np.float32) / 1000.0
    return np.where(np.isfinite(d) & (d > 0), d, 0.0).astype(np.float32)


class MaskCoding:
    """How raw mask values become class ids: a 256-entry table (``IGNORE`` for void) and the raw
    values that are neither (bad)."""

    def __init__(self, num_classes: int, ignore: int | None, shift: int = 0, void_above: bool = False):
        if num_classes > IGNORE:
            raise ConfigError(f"{num_classes} classes do not fit uint8 masks with {IGNORE} as void; at most {IGNORE}")
        raw = np.arange(256)
        ids = raw - shift
        self.void = (raw == ignore) if ignore is not None else np.zeros(256, bool)
        if void_above or ignore is None:
            self.void |= (ids >= num_classes) | (ids < 0)
        self.bad = ~self.void & ((ids >= num_classes) | (ids < 0))
        self.lut = np.where(self.void | self.bad, IGNORE, ids).astype(np.uint8)

    def void_values(self) -> list[int]:
        return np.flatnonzero(self.void).tolist()

    def apply(self, raw: np.ndarray, name: str, num_classes: int) -> np.ndarray:
        bad = self.bad[raw]
        if bad.any():
            vals = sorted(set(np.unique(raw[bad]).tolist()))
            raise BadImageError(f"{name}: mask values {vals[:8]} are outside the {num_classes} classes and not void")
        return self.lut[raw]


class PairSource:
    """The (image, target) files of a dataset; ``name(j)`` is the image's path (the target's if the
    image is missing). ``image(j, c)`` decodes and checks the whole pair, so the scan judges pairs."""

    scannable = True
    what = "image/target pairs"

    def __init__(self, pairs, task: str, coding: MaskCoding | None, num_classes: int):
        self.pairs, self.task, self.coding, self.num_classes = list(pairs), task, coding, num_classes

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, j: int) -> str:
        img, tgt = self.pairs[j]
        return img or tgt

    def pair(self, j: int, in_chans: int) -> tuple[Image.Image, dict]:
        img_path, tgt_path = self.pairs[j]
        kind = "mask" if self.task == "segment" else "depth map"
        if img_path is None:
            raise BadImageError(f"{tgt_path}: {kind} without an image (no image file with the same name)")
        if tgt_path is None:
            raise BadImageError(f"{img_path}: image without a {kind} (no {kind} file with the same name)")
        img = decode_image(_read_bytes(img_path), in_chans, name=img_path)
        if self.task == "segment":
            raw = read_mask_values(tgt_path)
            target = raw if self.coding is None else self.coding.apply(raw, img_path, self.num_classes)
        else:
            target = read_depth(tgt_path)
        if target.shape != (img.height, img.width):
            raise BadImageError(f"{img_path}: {kind} {tgt_path} is {target.shape[1]}x{target.shape[0]} but the "
                                f"image is {img.width}x{img.height}")
        return img, {"mask": Image.fromarray(target, "L")} if self.task == "segment" else {"depth": target}

    def image(self, j: int, in_chans: int) -> Image.Image:
        return self.pair(j, in_chans)[0]


class DenseDataset:
    """Images with a mask (``task="segment"``) or a depth map (``task="depth"``).

    ``load(i)`` returns ``(image, target, bad_files)``; an unreadable pair is replaced by a
    seeded pseudo-random other one and named in ``bad_files`` (as :class:`ImageDataset` does).
    ``exclude(names)`` leaves out pairs found bad before training. ``notes`` are lines for the
    plan (which raw mask values are void, where the classes come from).
    """

    def __init__(self, source: PairSource, *, task: str, classes: list[str], in_chans: int = 3,
                 indices: list[int] | None = None, format: str = "", max_bad_fraction: float = 0.05,
                 notes: list[str] | None = None):
        if in_chans not in (1, 3):
            raise ConfigError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
        self.source, self.task, self.format = source, task, format
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.ignore_index = IGNORE
        self.in_chans = in_chans
        self.notes = list(notes or [])
        self.skips = SkipCounter(max_bad_fraction)
        self.bad_files: list[str] = []

    def exclude(self, names) -> DenseDataset:
        return leave_out(self, names)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> tuple[Image.Image, dict, list[str]]:
        def read(idx: int):
            return self.source.pair(self.indices[idx], self.in_chans)

        (img, target), bad = first_readable(i, len(self.indices), read, f"pairs of the {self.format} dataset")
        return img, target, bad

    def __getitem__(self, i: int):
        img, target, bad = self.load(i)
        self.skips.add(1, bad)
        return img, target

    def stats(self, max_samples: int = 200, seed: int = 0) -> dict:
        sizes = []
        for i in np.random.default_rng(seed).permutation(len(self))[:max_samples]:
            try:
                sizes.append(self.source.image(self.indices[int(i)], self.in_chans).size)
            except BadImageError:
                continue
        size = (int(np.median([s[1] for s in sizes])), int(np.median([s[0] for s in sizes]))) if sizes else (0, 0)
        return {"typical_size": size, "in_chans": self.in_chans, "num_classes": self.num_classes, "n": len(self)}

    def describe(self) -> str:
        head = f"{self.format}: {len(self)} pairs, " + (f"{self.num_classes} classes" if self.task == "segment"
                                                         else "depth in metres")
        return "; ".join([head, *self.notes])

    def __repr__(self) -> str:
        return f"DenseDataset(format={self.format!r}, task={self.task!r}, n={len(self)}, classes={self.num_classes})"


def _max_value(paths: list[str]) -> int:
    def one(p):
        try:
            return int(read_mask_values(p).max(initial=0))
        except BadImageError:
            return -1
    with ThreadPoolExecutor(min(16, 2 * (os.cpu_count() or 1))) as pool:
        return max(pool.map(one, paths), default=-1)


_CODINGS: dict[tuple, tuple] = {}


def _coding(layout: DenseLayout, ignore_index: int | None) -> tuple[list[str], MaskCoding, list[str]]:
    """Classes, the mask coding and the notes for ``layout``; the mask scan is done once per layout."""
    ignore = ignore_index if ignore_index is not None else layout.ignore
    shift = layout.shift if ignore == layout.ignore else 0
    notes = []
    if layout.classes:
        classes = list(layout.classes)
        coding = MaskCoding(len(classes), ignore, shift, void_above=ignore is None)
        notes.append(f"{len(classes)} classes from {layout.classes_from}")
    else:
        masks = [t for _, t in layout.all_pairs() if t]
        key = (layout.root, layout.format, len(masks), ignore, shift)
        if key not in _CODINGS:
            probe = MaskCoding(IGNORE, ignore, shift)
            top = _max_value(masks)
            ids = [int(probe.lut[v]) for v in range(top + 1) if probe.lut[v] != IGNORE]
            _CODINGS[key] = (max(ids, default=0) + 1,)
        n = _CODINGS[key][0]
        classes = [f"class_{i}" for i in range(n)]
        # Without a class list every value above the largest seen is void rather than bad.
        coding = MaskCoding(n, ignore, shift, void_above=True)
        notes.append(f"{n} classes (0..{n - 1} seen in the masks; add a classes.txt to name them)")
    void = coding.void_values()
    if void:
        if len(void) <= 3:
            shown = ", ".join(map(str, void))
        elif void == list(range(void[0], void[-1] + 1)):
            shown = f"{void[0]}..{void[-1]}"
        else:
            shown = ", ".join(map(str, void[:3])) + ", ..."
        notes.append(f"mask value{'s' if len(void) > 1 else ''} {shown} = void (ignored), read as {IGNORE}")
    if shift:
        notes.append(f"raw mask values shifted down by {shift} (value {shift} is class 0)")
    return classes, coding, notes


def _builtin(path: str, task: str, split: str, seed: int, in_chans: int):
    name, _, count = path.partition(":")
    try:
        n = int(count) if count else 2000
    except ValueError:
        n = 0
    if n <= 0:
        raise DataError(f"{path!r}: expected '{name}' or '{name}:N' with N a positive number of training images")
    n_split = n if split == "train" else max(50, n // 5)
    # Imported by name when asked for, so that this module loads without the renderers.
    if name == "scenes":
        return importlib.import_module(f"{__package__}.scenes").ScenesDataset(
            n_split, split=split, seed=seed, in_chans=in_chans, task=task)
    return importlib.import_module(f"{__package__}.depth_scenes").DepthScenesDataset(
        n_split, split=split, seed=seed, in_chans=in_chans)


def _split(layout: DenseLayout, split: str, val_fraction: float, seed: int):
    if "train" in layout.splits and "val" in layout.splits:
        return layout.splits[split]
    pairs = layout.splits.get("train") or layout.pairs
    order = np.random.default_rng(seed).permutation(len(pairs)).tolist()
    k = min(max(1, int(round(val_fraction * len(pairs)))), max(len(pairs) - 1, 0))
    chosen = sorted(order[:k]) if split == "val" else sorted(order[k:])
    return [pairs[j] for j in chosen]


def build_dense_dataset(path: str, task: str, split: str = "train", *, val_fraction: float = 0.1, seed: int = 0,
                        in_chans: int = 3, ignore_index: int | None = None, max_bad_fraction: float = 0.05):
    """Open the ``split`` ("train" | "val") of the segmentation (``task="segment"``) or depth
    (``task="depth"``) data at ``path``; see the module notes for the layouts and mask rules.

    A dataset without its own val split is split by a seeded fraction ``val_fraction``.

    Raises:
        PathNotFoundError: nothing at ``path``.
        DataError: no layout of the task at ``path``, or no pairs in the split.
        ConfigError: a bad ``task``, ``split`` or ``ignore_index``.
    """
    if task not in ("segment", "depth"):
        raise ConfigError(f"build_dense_dataset reads segmentation or depth data, not task {task!r}")
    check_split(split, val_fraction)
    if ignore_index is not None and not 0 <= ignore_index <= 255:
        raise ConfigError(f"data.ignore_index must be a mask value 0..255, got {ignore_index}")
    path = str(path)
    name = path.partition(":")[0]
    if name in ("scenes", "depth-scenes"):
        return _builtin(path, task, split, seed, in_chans)
    if not os.path.exists(path):
        raise PathNotFoundError(f"no such folder: {path!r}; check the path")
    layout = find_segment_layout(path) if task == "segment" else find_depth_layout(path)
    if layout is None:
        kind, layouts = ("masks", DENSE_LAYOUTS) if task == "segment" else ("depth maps", DEPTH_LAYOUTS)
        raise DataError(f"{path}: no {kind} found for task {task!r}; the layouts read are {layouts}")
    pairs = _split(layout, split, val_fraction, seed)
    if not pairs:
        raise DataError(f"{path}: the {split} split of the {layout.format} layout holds no image pairs")
    if task == "segment":
        classes, coding, notes = _coding(layout, ignore_index)
    else:
        classes, coding, notes = [], None, []
    source = PairSource(pairs, task, coding, len(classes))
    return DenseDataset(source, task=task, classes=classes, in_chans=in_chans, format=layout.format,
                        max_bad_fraction=max_bad_fraction, notes=notes)
