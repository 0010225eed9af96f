"""The built-in multi-instance scenes: labels follow the visible pixels, captions follow the labels."""

from __future__ import annotations

import pickle
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vitkit.data.scenes import SCENE_CLASSES, ScenesDataset, compose_scene, render_scene, scene_caption
from vitkit.data.shapes import _COLOURS
from vitkit.errors import ConfigError

_WORDS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


def _bbox(mask: np.ndarray) -> list[float]:
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    return [x0, y0, x1 + 1, y1 + 1]


def _parse_caption(caption: str) -> Counter:
    """(colour, shape) -> count, read back from the words of a caption."""
    body, _, background = caption.rpartition(" on a ")
    assert background.endswith(" background"), caption
    out: Counter = Counter()
    for part in re.split(r", | and ", body):
        count, colour, noun = part.split(" ")
        shape = next(s for s in SCENE_CLASSES[1:] if noun in (s, s + "s", s + "es"))
        assert (noun == shape) == (_WORDS[count] == 1), part
        out[(colour, shape)] += _WORDS[count]
    return out


def test_random_scenes_label_the_visible_pixels():
    rng = np.random.default_rng(7)
    seen_overlap = seen_empty = 0
    for _ in range(60):
        s = render_scene(rng, 64)
        masks, labels, boxes, sem = s["instance_masks"], s["labels"], s["boxes"], s["semantic"]
        k = len(labels)
        assert s["image"].shape == (64, 64, 3) and s["image"].dtype == np.uint8
        assert masks.shape == (k, 64, 64) and masks.dtype == bool
        assert labels.dtype == np.int64 and boxes.dtype == np.float32 and boxes.shape == (k, 4)
        assert sem.dtype == np.uint8 and sem.shape == (64, 64)
        cover = masks.sum(0)
        assert cover.max(initial=0) <= 1  # disjoint
        np.testing.assert_array_equal(cover > 0, sem != 0)  # union = foreground
        for m, c, b in zip(masks, labels, boxes):
            assert m.any(), "a hidden instance must be dropped"
            assert 1 <= c < len(SCENE_CLASSES)
            assert np.all(sem[m] == c)
            np.testing.assert_array_equal(b, _bbox(m))
        seen_empty += k == 0
        seen_overlap += any(  # two visible extents that overlap: one shape covers part of another
            min(boxes[i, 2], boxes[j, 2]) > max(boxes[i, 0], boxes[j, 0])
            and min(boxes[i, 3], boxes[j, 3]) > max(boxes[i, 1], boxes[j, 1])
            for i in range(k) for j in range(i)
        )
    assert seen_empty >= 1 and seen_overlap >= 10


def _circle(cx, cy, r, name="red", shape="circle"):
    return {"shape": shape, "colour_name": name, "colour": _COLOURS[name], "cx": cx, "cy": cy, "r": r, "theta": 0.0}


def test_occlusion_order_against_analytic_discs():
    size = 64
    bg = np.full((size, size, 3), 120.0)
    specs = [
        _circle(20, 20, 14, "red"),
        _circle(30, 24, 12, "blue"),
        _circle(44, 44, 4, "green"),  # hidden under the next one entirely
        _circle(44, 44, 10, "yellow"),
        _circle(26, 18, 6, "white"),
    ]
    s = compose_scene(bg, "plain", specs)
    # The reference: at each pixel centre, the last disc that contains it. Pixels within one
    # pixel of any rim are left out, since anti-aliasing decides them.
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    top = np.full((size, size), -1)
    unsure = np.zeros((size, size), bool)
    for k, c in enumerate(specs):
        dist = np.hypot(xx - c["cx"], yy - c["cy"])
        top[dist < c["r"]] = k
        unsure |= np.abs(dist - c["r"]) < 1.0
    visible = [0, 1, 3, 4]
    assert len(s["labels"]) == 4 and s["colours"] == ["red", "blue", "yellow", "white"]
    for m, k in zip(s["instance_masks"], visible):
        np.testing.assert_array_equal(m[~unsure], (top == k)[~unsure])
    assert np.all(s["semantic"][~unsure] == np.where(top >= 0, 1, 0)[~unsure])  # circle is class 1
    # Each visible pixel shows the colour of its top disc.
    inner = (s["instance_masks"][1] & ~unsure)
    np.testing.assert_array_equal(s["image"][inner], np.broadcast_to(_COLOURS["blue"], (inner.sum(), 3)))
    assert s["caption"] == "a red circle, a blue circle, a yellow circle and a white circle on a plain background"


def test_caption_wording():
    items = [("red", "circle"), ("blue", "square"), ("blue", "square")]
    assert scene_caption("striped", items) == "a red circle and two blue squares on a striped background"
    assert scene_caption("noisy", [("orange", "cross")] * 3) == "three orange crosses on a noisy background"
    assert scene_caption("plain", [("orange", "star")]) == "an orange star on a plain background"
    assert scene_caption("gradient", []) == "a gradient background with no shapes"


def test_captions_count_the_instances_and_name_their_colours():
    ds = ScenesDataset(n=40, img_size=64, seed=3)
    names = list(_COLOURS)
    ref = np.asarray([_COLOURS[n] for n in names], np.float32)
    for i in range(len(ds)):
        s = ds.render(i)
        said = _parse_caption(s["caption"]) if len(s["labels"]) else Counter()
        shapes_said = Counter({shape: 0 for shape in SCENE_CLASSES[1:]})
        for (_, shape), k in said.items():
            shapes_said[shape] += k
        shapes_drawn = Counter({shape: 0 for shape in SCENE_CLASSES[1:]})
        shapes_drawn.update(SCENE_CLASSES[c] for c in s["labels"])
        assert shapes_said == shapes_drawn, s["caption"]
        # The colour the caption gives a shape is the named colour nearest its pixels.
        for m, c in zip(s["instance_masks"], s["labels"]):
            if m.sum() < 40:
                continue
            median = np.median(s["image"][m].astype(np.float32), axis=0)
            nearest = names[int(np.argmin(np.linalg.norm(ref - median, axis=1)))]
            assert said[(nearest, SCENE_CLASSES[c])] >= 1, (s["caption"], nearest, SCENE_CLASSES[c])


def test_deterministic_and_splits_disjoint():
    a, b = ScenesDataset(n=8, seed=1, img_size=48), ScenesDataset(n=8, seed=1, img_size=48)
    for i in range(8):
        ra, rb = a.render(i), b.render(i)
        np.testing.assert_array_equal(ra["image"], rb["image"])
        np.testing.assert_array_equal(ra["semantic"], rb["semantic"])
        assert ra["caption"] == rb["caption"]
    val = ScenesDataset(n=8, split="val", seed=1, img_size=48)
    other = ScenesDataset(n=8, seed=2, img_size=48)
    train_imgs = {a.render(i)["image"].tobytes() for i in range(8)}
    assert not train_imgs & {val.render(i)["image"].tobytes() for i in range(8)}
    assert not train_imgs & {other.render(i)["image"].tobytes() for i in range(8)}
    # A dataset survives the trip to a DataLoader worker.
    c = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(c.render(3)["image"], a.render(3)["image"])


def test_dataset_interface():
    ds = ScenesDataset(n=6, img_size=40)
    assert ds.task == "segment" and ds.format == "scenes" and ds.ignore_index == 255
    assert ds.classes == list(SCENE_CLASSES) and ds.num_classes == 7 and ds.classes[0] == "background"
    img, target, bad = ds.load(2)
    assert img.mode == "RGB" and img.size == (40, 40) and bad == [] and set(target) == {"mask"}
    assert target["mask"].mode == "L" and target["mask"].size == (40, 40)
    np.testing.assert_array_equal(np.asarray(target["mask"]), ds.render(2)["semantic"])
    np.testing.assert_array_equal(np.asarray(img), ds.render(2)["image"])
    assert ds[2][0].size == (40, 40) and ds.skips.seen == 1
    assert ds.stats() == {"typical_size": (40, 40), "in_chans": 3, "num_classes": 7, "n": 6}
    assert ds.source.name(4) == "scenes[4]" and len(ds.source) == 6

    ds.exclude(["scenes[1]", "elsewhere.png"])
    assert len(ds) == 5 and ds.indices == [0, 2, 3, 4, 5] and ds.bad_files == ["scenes[1]"]
    np.testing.assert_array_equal(ds.render(1)["image"], ScenesDataset(n=6, img_size=40).render(2)["image"])

    gray = ScenesDataset(n=2, img_size=40, in_chans=1)
    assert gray.load(0)[0].mode == "L" and gray.sample(0)["image"].mode == "L"
    full = ScenesDataset(n=2, img_size=40, task="detect").load(1)[1]
    assert set(full) == {"mask", "instance_masks", "labels", "boxes", "caption"}
    assert isinstance(full["mask"], Image.Image)

    with pytest.raises(ConfigError, match="split"):
        ScenesDataset(n=2, split="test")
    with pytest.raises(ConfigError, match="task"):
        ScenesDataset(n=2, task="depth")
    with pytest.raises(ConfigError, match="in_chans"):
        ScenesDataset(n=2, in_chans=2)
    with pytest.raises(ConfigError, match="img_size"):
        ScenesDataset(n=2, img_size=8)
