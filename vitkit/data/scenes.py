"""Built-in procedural scenes: several coloured shapes per image, for dense and image-text tasks.

Each image holds 0 to ``max_instances`` shapes from the ``shapes`` vocabulary, drawn one over
the other on the same textured backgrounds as the ``shapes`` set: a later shape covers an
earlier one. Every label follows the visible pixels: the instance masks are disjoint, the
semantic mask holds the class of the top shape at each pixel (0 = background, shape ``k`` is
class ``k + 1``), boxes are the visible extent and a shape hidden entirely is left out. The
caption is written from the same content ("a red circle and two blue squares on a striped
background"). Like ``shapes``, image ``index`` is fixed by ``(seed, split, index)``, train and
val never share a random stream, and nothing is stored on disk.

:class:`ScenesDataset` serves segmentation (``load`` gives the image and its class mask);
``render``/``sample`` give the full scene (instance masks, boxes, labels, caption) for
detection, captioning and prompting. :class:`ProceduralDataset` is the dataset interface it
shares with :class:`vitkit.data.depth_scenes.DepthScenesDataset`.
"""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError
from .shapes import _BACKGROUNDS, _SPLIT_STREAM, DEFAULT_CLASSES, _background, _draw_mask, _pick_colour
from .skips import SkipCounter, leave_out

SCENE_CLASSES = ("background",) + DEFAULT_CLASSES
SCENE_TASKS = ("segment", "detect", "caption", "promptable")

_EMPTY_P = 0.05  # share of images with no shape at all: models must learn "nothing here" too
_RADIUS = (0.08, 0.20)  # shape radius as a fraction of the image side
_PLACE_TRIES = 6
# A new shape is moved (up to _PLACE_TRIES times) when it would leave an earlier one less
# than this share of its visible pixels; the last try is kept, so heavy and full occlusion
# still happen, only rarely.
_MIN_KEPT = 0.4
_NUMBERS = ("no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "sh", "ch")) else "s")


def scene_caption(kind: str, items: list[tuple[str, str]]) -> str:
    """Describe ``items`` (``(colour, shape)`` pairs, bottom first) on a ``kind`` background.

    Equal pairs are counted together, in order of first appearance:
    ``"a red circle and two blue squares on a striped background"``.
    """
    if not items:
        return f"a {kind} background with no shapes"
    parts = []
    for (colour, shape), k in Counter(items).items():
        count = _NUMBERS[k] if k < len(_NUMBERS) else str(k)
        if k == 1 and colour[0] in "aeiou":
            count = "an"
        parts.append(f"{count} {colour} {shape if k == 1 else _plural(shape)}")
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{text} on a {kind} background"


def compose_scene(bg: np.ndarray, kind: str, specs: list[dict], classes=DEFAULT_CLASSES) -> dict:
    """Draw ``specs`` in order over the background ``bg`` (float (H, W, 3)) and label the result.

    Each spec is ``{"shape", "colour_name", "colour" (RGB floats), "cx", "cy", "r", "theta"}``
    in pixels and radians (an ``"alpha"`` coverage map, when given, is used as drawn). Returns
    the dict of :func:`render_scene`.
    """
    size = bg.shape[0]
    image = bg.astype(np.float32)
    owner = np.full(bg.shape[:2], -1, np.int64)  # index of the top spec at each pixel
    for k, s in enumerate(specs):
        alpha = s.get("alpha")
        if alpha is None:
            alpha = _draw_mask(s["shape"], size, s["cx"], s["cy"], s["r"], s["theta"], None)
        image = image * (1 - alpha[..., None]) + np.asarray(s["colour"], np.float32) * alpha[..., None]
        owner[alpha > 0.5] = k
    return _labels(image, owner, kind, specs, classes)


def _labels(image: np.ndarray, owner: np.ndarray, kind: str, specs: list[dict], classes) -> dict:
    visible = [k for k in range(len(specs)) if (owner == k).any()]
    masks = np.stack([owner == k for k in visible]) if visible else np.zeros((0,) + owner.shape, bool)
    labels = np.asarray([classes.index(specs[k]["shape"]) + 1 for k in visible], np.int64)
    boxes = np.zeros((len(visible), 4), np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # exclusive right/bottom, like shapes
    semantic = np.zeros(owner.shape, np.uint8)
    for m, c in zip(masks, labels):
        semantic[m] = c
    return {
        "image": np.clip(np.rint(image), 0, 255).astype(np.uint8),
        "instance_masks": masks,
        "labels": labels,
        "boxes": boxes,
        "semantic": semantic,
        "caption": scene_caption(kind, [(specs[k]["colour_name"], specs[k]["shape"]) for k in visible]),
        "colours": [specs[k]["colour_name"] for k in visible],
        "background": kind,
    }


def render_scene(rng: np.random.Generator, size: int, *, max_instances: int = 4, classes=DEFAULT_CLASSES) -> dict:
    """Draw one random scene of ``size`` x ``size`` pixels.

    Returns ``{image: uint8 (H, W, 3), instance_masks: bool (K, H, W), labels: int64 (K,),
    boxes: float32 (K, 4) xyxy pixels, semantic: uint8 (H, W), caption: str, colours: list[str],
    background: str}``. ``labels`` and ``semantic`` index ``("background",) + classes``
    (:data:`SCENE_CLASSES` by default; 0 is never a label); boxes end one past the last visible
    pixel. ``K`` counts the visible shapes, bottom first.
    """
    kind = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    bg = _background(kind, size, rng)
    count = 0 if rng.random() < _EMPTY_P else int(rng.integers(1, max_instances + 1))
    owner = np.full((size, size), -1, np.int64)
    specs: list[dict] = []
    for k in range(count):
        shape = classes[int(rng.integers(len(classes)))]
        used = {s["colour_name"] for s in specs}
        for _ in range(5):  # prefer a colour no other shape has, so neighbours stay apart
            name, colour = _pick_colour(bg, rng)
            if name not in used:
                break
        before = np.bincount(owner[owner >= 0], minlength=k)
        for attempt in range(_PLACE_TRIES):
            r = size * rng.uniform(*_RADIUS)
            cx, cy = rng.uniform(r, size - r, 2)
            theta = rng.uniform(0, 2 * np.pi)
            alpha = _draw_mask(shape, size, cx, cy, r, theta, None)
            cover = alpha > 0.5
            kept = np.bincount(owner[(owner >= 0) & ~cover], minlength=k)
            if attempt == _PLACE_TRIES - 1 or np.all(kept >= _MIN_KEPT * before):
                break
        owner[cover] = k
        specs.append(
            {"shape": shape, "colour_name": name, "colour": colour, "cx": cx, "cy": cy, "r": r, "theta": theta, "alpha": alpha}
        )
    return compose_scene(bg, kind, specs, classes)


class ProceduralSource:
    """Seeded images rendered on demand: item ``j`` comes from ``render(rng([seed, stream, j]), size)``."""

    def __init__(self, render, prefix: str, n: int, img_size: int, seed: int, stream: int):
        self._render, self.prefix = render, prefix
        self.n, self.img_size, self.seed, self.stream = n, img_size, seed, stream

    def __len__(self) -> int:
        return self.n

    def name(self, j: int) -> str:
        return f"{self.prefix}[{j}]"

    def render(self, j: int) -> dict:
        return self._render(np.random.default_rng([self.seed, self.stream, j]), self.img_size)

    def image(self, j: int, in_chans: int) -> Image.Image:
        img = Image.fromarray(self.render(j)["image"], "RGB")
        return img if in_chans == 3 else img.convert("L")


class ProceduralDataset(Dataset):
    """The dense dataset interface over images rendered by ``render(rng, img_size)``.

    Subclasses say what ``load`` returns (:meth:`_target`). ``n``, ``split``, ``seed``,
    ``img_size`` and ``in_chans`` are as in :class:`ScenesDataset`; ``format`` also names the
    items (``"scenes[7]"``).

    ``ds[i]`` and ``ds.load(i)`` give ``(PIL image, target dict)`` (``load`` adds the list of
    unreadable files, always empty here). Nothing is read from disk, so nothing is ever bad.
    """

    task = ""
    ignore_index = 255  # never present in the targets of a procedural set

    def __init__(
        self, render, *, n: int, split: str, seed: int, img_size: int, in_chans: int, classes, task: str, format: str
    ):
        if split not in _SPLIT_STREAM:
            raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
        if in_chans not in (1, 3):
            raise ConfigError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
        if n < 1:
            raise ConfigError(f"the {format} set needs at least one image, got n={n}")
        if img_size < 16:
            raise ConfigError(f"img_size must be at least 16 pixels, got {img_size}")
        source = ProceduralSource(render, format, n, img_size, seed, _SPLIT_STREAM[split])
        self.source = source
        self.indices = list(range(len(source)))
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.task, self.split, self.in_chans, self.format = task, split, in_chans, format
        self.img_size = source.img_size
        self.skips = SkipCounter()
        self.bad_files: list[str] = []

    def __len__(self) -> int:
        return len(self.indices)

    def exclude(self, names) -> ProceduralDataset:
        """Leave out the items whose source name is in ``names``; they go to ``bad_files``."""
        return leave_out(self, names)

    def render(self, i: int) -> dict:
        """The full rendered sample ``i`` as numpy arrays (image uint8 (H, W, 3))."""
        return self.source.render(self.indices[i])

    def sample(self, i: int) -> dict:
        """Like :meth:`render` with ``image`` a PIL image in this dataset's mode."""
        out = self.render(i)
        out["image"] = self._pil(out["image"])
        return out

    def _pil(self, array: np.ndarray) -> Image.Image:
        img = Image.fromarray(array, "RGB")
        return img if self.in_chans == 3 else img.convert("L")

    def _target(self, out: dict) -> dict:
        raise NotImplementedError

    def load(self, i: int) -> tuple[Image.Image, dict, list[str]]:
        """Return ``(image, target, bad_files)`` for item ``i``; ``bad_files`` is always empty."""
        out = self.render(i)
        return self._pil(out["image"]), self._target(out), []

    def __getitem__(self, i: int) -> tuple[Image.Image, dict]:
        img, target, bad = self.load(i)
        self.skips.add(1, bad)
        return img, target

    def stats(self, max_samples: int = 200, seed: int = 0) -> dict:
        return {
            "typical_size": (self.img_size, self.img_size), "in_chans": self.in_chans,
            "num_classes": self.num_classes, "n": len(self),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(format={self.format!r}, task={self.task!r}, n={len(self)}, split={self.split!r})"


class ScenesDataset(ProceduralDataset):
    """Seeded multi-shape scenes; ``load(i)`` is ``(image, {"mask": PIL "L"}, [])`` for segmentation.

    Args:
        n: number of images in this split.
        split: "train" or "val"; the two splits draw from disjoint random streams.
        seed: base seed; ``(seed, split, index)`` fixes every pixel and label of image ``index``.
        img_size: side of the square images.
        in_chans: 3 (RGB) or 1 (grayscale).
        task: "segment" (the class mask); "detect", "caption" or "promptable" give the full
            scene as the target (``mask``, ``instance_masks``, ``labels``, ``boxes``, ``caption``).
        max_instances: most shapes in one image.

    ``classes`` is :data:`SCENE_CLASSES` (background first); mask values index it.
    """

    def __init__(
        self, n: int = 2000, split: str = "train", seed: int = 0, img_size: int = 128, in_chans: int = 3,
        task: str = "segment", *, max_instances: int = 4,
    ):
        if task not in SCENE_TASKS:
            raise ConfigError(f"the scenes set serves the tasks {SCENE_TASKS}, got task={task!r}")
        if not 1 <= max_instances <= 20:
            raise ConfigError(f"max_instances must be in 1..20, got {max_instances}")

        render = functools.partial(render_scene, max_instances=max_instances)  # picklable, for spawned workers
        super().__init__(
            render, n=n, split=split, seed=seed, img_size=img_size, in_chans=in_chans,
            classes=SCENE_CLASSES, task=task, format="scenes",
        )
        self.max_instances = max_instances

    def _target(self, out: dict) -> dict:
        mask = Image.fromarray(out["semantic"], "L")
        if self.task == "segment":
            return {"mask": mask}
        keys = ("instance_masks", "labels", "boxes", "caption")
        return {"mask": mask, **{k: out[k] for k in keys}}
