"""Built-in procedural data: coloured shapes on textured backgrounds.

Each image shows one shape; the shape alone is the class. Colour, position, size (42-80% of
the image), rotation and background (plain, gradient, stripes, noise, checks) are drawn at
random and independently of the class, so a model can only score by recognising the shape.
Images are generated lazily from ``(seed, split, index)``: the same index always gives the
same pixels, train and val never share a random stream, and nothing is stored on disk.

``dataset.sample(i)`` also returns the shape's mask, box and a caption, for dense and
image-text tasks; :func:`shape_captions` words the same content several ways.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .dataset import ImageDataset

DEFAULT_CLASSES = ("circle", "square", "triangle", "star", "hexagon", "cross")
EXTRA_CLASSES = ("pentagon", "ring", "arrow", "crescent")

_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 20),
    "purple": (140, 40, 190),
    "cyan": (40, 210, 220),
    "magenta": (220, 40, 200),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "pink": (250, 150, 180),
    "brown": (130, 80, 30),
}
_BACKGROUNDS = ("plain", "gradient", "striped", "noisy", "checkered")
_SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down, for smooth edges
_SPLIT_STREAM = {"train": 0, "val": 1}


def _polygon(shape: str, rng: np.random.Generator) -> list[tuple[float, float]] | None:
    """Vertices on the unit circle (before rotation/scale) for polygonal shapes; None for round ones."""
    if shape in ("square", "triangle", "hexagon", "pentagon"):
        k = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[shape]
        return [(math.cos(2 * math.pi * i / k), math.sin(2 * math.pi * i / k)) for i in range(k)]
    if shape == "star":
        return [
            ((1.0 if i % 2 == 0 else 0.42) * math.cos(math.pi * i / 5), (1.0 if i % 2 == 0 else 0.42) * math.sin(math.pi * i / 5))
            for i in range(10)
        ]
    if shape == "cross":
        a, w = 1.0, 0.32
        return [(w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w), (-w, -a), (w, -a), (w, -w), (a, -w), (a, w)]
    if shape == "arrow":
        return [(1.0, 0.0), (0.1, 0.75), (0.1, 0.3), (-1.0, 0.3), (-1.0, -0.3), (0.1, -0.3), (0.1, -0.75)]
    return None


def _draw_mask(shape: str, size: int, cx: float, cy: float, r: float, theta: float, rng) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], shape (size, size)."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = cx * s, cy * s, r * s
    poly = _polygon(shape, rng)
    if poly is not None:
        c, sn = math.cos(theta), math.sin(theta)
        draw.polygon([(cx + r * (x * c - y * sn), cy + r * (x * sn + y * c)) for x, y in poly], fill=255)
    elif shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = cx + 0.5 * r * math.cos(theta), cy + 0.5 * r * math.sin(theta)
        draw.ellipse([ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r], fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {DEFAULT_CLASSES + EXTRA_CLASSES}")
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A float (size, size, 3) texture in 0..255 of low contrast, so the shape stays the salient thing."""
    c1 = rng.uniform(40, 215, 3)
    c2 = np.clip(c1 + rng.normal(0, 30, 3), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == "plain":
        t = np.zeros((size, size), np.float32)
    elif kind == "gradient":
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    elif kind == "striped":
        period = rng.uniform(0.08, 0.25)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * along / period)
    elif kind == "noisy":
        t = rng.uniform(0, 1, (size, size)).astype(np.float32)
    else:
        cell = int(rng.integers(4, 13))
        iy, ix = np.mgrid[0:size, 0:size] // cell
        t = ((iy + ix) % 2).astype(np.float32)
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def _pick_colour(bg: np.ndarray, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """A named colour, jittered, that stands out from the background ``bg`` (float (H, W, 3))."""
    # Resampling against the background's mean depends only on the (class-independent)
    # background, so colour never carries the class.
    names = list(_COLOURS)
    mean = bg.mean(axis=(0, 1))
    for _ in range(30):
        name = names[int(rng.integers(len(names)))]
        colour = np.clip(np.asarray(_COLOURS[name], np.float32) + rng.normal(0, 12, 3), 0, 255)
        if np.linalg.norm(colour - mean) > 110:
            break
    return name, colour


def _shape_params(size: int, rng: np.random.Generator) -> dict:
    """The random draws of one sample before its shape is drawn: background, colour, placement."""
    kind = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    bg = _background(kind, size, rng)
    name, colour = _pick_colour(bg, rng)
    r = size * rng.uniform(0.21, 0.40)  # diameter 42-80% of the image
    cx, cy = rng.uniform(r, size - r, 2)
    theta = rng.uniform(0, 2 * math.pi)
    return {"kind": kind, "bg": bg, "name": name, "colour": colour, "r": r, "cx": cx, "cy": cy, "theta": theta}


def render_shape(shape: str, size: int, rng: np.random.Generator) -> dict:
    """Draw one sample: ``{image: uint8 (size, size, 3), mask: bool (size, size), box, caption, colour,
    background}`` (``colour`` and ``background`` are the names the caption uses)."""
    p = _shape_params(size, rng)
    alpha = _draw_mask(shape, size, p["cx"], p["cy"], p["r"], p["theta"], rng)
    image = p["bg"] * (1 - alpha[..., None]) + p["colour"] * alpha[..., None]
    mask = alpha > 0.5
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else (0, 0, 0, 0)
    return {
        "image": np.clip(np.rint(image), 0, 255).astype(np.uint8),
        "mask": mask,
        "box": box,
        "caption": f"a {p['name']} {shape} on a {p['kind']} background",
        "colour": p["name"],
        "background": p["kind"],
    }


# Paraphrases of the captioned shapes. None reads like a zero-shot prompt ("a photo of a ..."),
# so zero-shot accuracy measured with such prompts is not the training captions read back.
CAPTION_TEMPLATES = (
    "{a_colour} {colour} {shape} on a {background} background",
    "a {shape} in {colour} over a {background} background",
    "{colour} {shape}, {background} background",
    "there is {a_colour} {colour} {shape} on a {background} backdrop",
    "a {background} background with {a_colour} {colour} {shape} on it",
    "the {shape} is {colour} and the background is {background}",
    "one {colour} {shape} drawn on a {background} pattern",
    "a drawing of {a_colour} {colour} {shape} against a {background} background",
)


def shape_captions(shape: str, colour: str, background: str, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` distinct paraphrases (from :data:`CAPTION_TEMPLATES`, drawn with ``rng``) naming the
    shape, its colour and the background kind."""
    pick = rng.permutation(len(CAPTION_TEMPLATES))[: max(1, min(n, len(CAPTION_TEMPLATES)))]
    a = "an" if colour[0] in "aeiou" else "a"
    return [CAPTION_TEMPLATES[int(k)].format(a_colour=a, colour=colour, shape=shape, background=background)
            for k in pick]


class _ShapesSource:
    def __init__(self, n: int, classes: tuple[str, ...], img_size: int, seed: int, stream: int):
        self.n, self.classes, self.img_size, self.seed, self.stream = n, classes, img_size, seed, stream

    def __len__(self) -> int:
        return self.n

    def name(self, j: int) -> str:
        return f"shapes[{j}]"

    def render(self, j: int) -> dict:
        rng = np.random.default_rng([self.seed, self.stream, j])
        out = render_shape(self.classes[j % len(self.classes)], self.img_size, rng)
        out["label"] = j % len(self.classes)
        return out

    def caption_fields(self, j: int) -> dict:
        """``{shape, colour, background}`` of image ``j``, drawn as :meth:`render` draws them but
        without drawing the shape (a tenth of the time)."""
        p = _shape_params(self.img_size, np.random.default_rng([self.seed, self.stream, j]))
        return {"shape": self.classes[j % len(self.classes)], "colour": p["name"], "background": p["kind"]}

    def image(self, j: int, in_chans: int) -> Image.Image:
        img = Image.fromarray(self.render(j)["image"], "RGB")
        return img if in_chans == 3 else img.convert("L")


class ShapesDataset(ImageDataset):
    """Seeded procedural shapes; ``ds[i]`` is ``(PIL image, label)`` like every vitkit dataset.

    Args:
        n: number of images in this split.
        split: "train" or "val"; the two splits draw from disjoint random streams.
        img_size: side of the square images.
        seed: base seed; ``(seed, split, index)`` fixes every pixel of image ``index``.
        classes: shape names, from :data:`DEFAULT_CLASSES` and :data:`EXTRA_CLASSES`.
        in_chans: 3 (RGB) or 1 (grayscale).

    Labels are ``index % num_classes``, so every class has the same count (up to one).
    """

    def __init__(
        self,
        n: int = 10000,
        split: str = "train",
        img_size: int = 64,
        seed: int = 0,
        classes: tuple[str, ...] = DEFAULT_CLASSES,
        in_chans: int = 3,
    ):
        if split not in _SPLIT_STREAM:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        unknown = [c for c in classes if c not in DEFAULT_CLASSES + EXTRA_CLASSES]
        if unknown or len(set(classes)) != len(classes) or len(classes) < 2:
            raise ValueError(
                f"classes must be at least 2 distinct names from {DEFAULT_CLASSES + EXTRA_CLASSES}, got {classes}"
            )
        if img_size < 16:
            raise ValueError(f"img_size must be at least 16 pixels for shapes to be recognisable, got {img_size}")
        source = _ShapesSource(n, tuple(classes), img_size, seed, _SPLIT_STREAM[split])
        targets = [j % len(classes) for j in range(n)]
        super().__init__(source, targets, list(classes), in_chans=in_chans, format="shapes")
        self.img_size = img_size
        self.split = split

    def sample(self, i: int) -> dict:
        """``{image: PIL, label: int, mask: bool ndarray (H, W), box: (x0, y0, x1, y1), caption: str}``."""
        out = self.source.render(self.indices[i])
        img = Image.fromarray(out["image"], "RGB")
        out["image"] = img if self.in_chans == 3 else img.convert("L")
        return out

    def stats(self, max_samples: int = 200, seed: int = 0) -> dict:
        return {
            "typical_size": (self.img_size, self.img_size), "in_chans": self.in_chans,
            "num_classes": self.num_classes, "n": len(self),
        }
