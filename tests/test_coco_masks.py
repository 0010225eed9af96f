"""COCO masks decoded without pycocotools agree with pycocotools: RLE strings, uncompressed RLE, polygons."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import lazy_peer

from vitkit.data.coco_masks import (
    decode_rle,
    encode_rle,
    polygons_to_mask,
    rle_from_string,
    rle_to_string,
    segmentation_mask,
)
from vitkit.errors import DataError

mask_api = lazy_peer("pycocotools.mask")


def _random_masks(seed=0):
    rng = np.random.default_rng(seed)
    masks = [np.zeros((7, 5), bool), np.ones((6, 9), bool)]
    for h, w in ((13, 17), (40, 31), (64, 64)):
        m = rng.random((h, w)) < rng.uniform(0.05, 0.95)
        masks.append(m)
        # Long runs make multi-group codes and negative deltas in the string form.
        blob = np.zeros((h, w), bool)
        blob[h // 4: 3 * h // 4, w // 5: w - 1] = True
        masks.append(blob)
    return masks


@pytest.mark.peer
def test_rle_string_codec_matches_pycocotools():
    for m in _random_masks():
        ref = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
        runs = encode_rle(m)["counts"]
        assert rle_to_string(runs) == ref["counts"].decode("ascii")
        assert rle_from_string(ref["counts"]) == runs
        np.testing.assert_array_equal(decode_rle({"counts": ref["counts"].decode(), "size": list(ref["size"])}), m)
        np.testing.assert_array_equal(mask_api.decode(ref).astype(bool), m)


@pytest.mark.peer
def test_uncompressed_rle_matches_pycocotools():
    for m in _random_masks(1):
        rle = encode_rle(m)
        ref = mask_api.frPyObjects(rle, *rle["size"])  # pycocotools reads the uncompressed form itself
        np.testing.assert_array_equal(mask_api.decode(ref).astype(bool), m)
        np.testing.assert_array_equal(segmentation_mask(rle, *m.shape), m)


@pytest.mark.peer
def test_polygons_match_pycocotools():
    rng = np.random.default_rng(0)
    h, w = 60, 80
    polys = [
        [[10, 10, 50, 12, 45, 40, 12, 35]],
        [[5.5, 5.2, 30.7, 8.1, 20.3, 25.9], [40, 30, 70, 30, 70, 55, 40, 55]],
        [list((np.array([40, 30]) + 20 * np.stack([np.cos(t), np.sin(t)], 1)).reshape(-1))
         for t in [np.linspace(0, 2 * np.pi, 24, endpoint=False)]],
        [list(rng.uniform(0, 60, 12))],
        [[4, 3, 7, 3, 7, 5, 4, 5]],  # whole pixels: exactly the 3 x 2 pixels it covers
    ]
    for poly in polys:
        ours = segmentation_mask(poly, h, w)
        ref = mask_api.decode(mask_api.merge(mask_api.frPyObjects(poly, h, w))).astype(bool)
        inter, union = (ours & ref).sum(), (ours | ref).sum()
        assert inter / union > 0.99, (inter / union)
        # pycocotools rounds vertices to 1/5 px: the few differing pixels lie on the outline.
        diff = np.argwhere(ours ^ ref)
        pad = np.pad(ref, 1, constant_values=False)
        for y, x in diff:
            nb = pad[y:y + 3, x:x + 3]
            assert nb.any() and not nb.all()


def test_bad_segmentations_say_what_is_wrong():
    with pytest.raises(DataError, match="runs summing"):
        decode_rle({"counts": [3, 4], "size": [3, 3]})
    with pytest.raises(DataError, match="counts"):
        decode_rle({"size": [3, 3]})
    with pytest.raises(DataError, match="at least 3"):
        polygons_to_mask([[1, 2, 3, 4]], 8, 8)
    with pytest.raises(DataError, match="size"):
        segmentation_mask(encode_rle(np.ones((4, 5), bool)), 5, 4)
