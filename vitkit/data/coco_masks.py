"""COCO instance masks without pycocotools: polygons, uncompressed RLE and compressed RLE strings.

A COCO ``segmentation`` is a list of polygons ``[[x0, y0, x1, y1, ...], ...]`` in pixel
coordinates (pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``), or a run-length encoding
``{"counts", "size": [h, w]}`` of the mask read in column-major order, starting with a run of
zeros. ``counts`` is a list of run lengths (uncompressed) or COCO's string code (compressed: each
run, from the third on as the difference to the run two before, written as 5-bit groups in
characters from ``'0'``, bit 0x20 meaning "more groups follow", bit 0x10 of the last group the sign).
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

__all__ = ["decode_rle", "encode_rle", "polygons_to_mask", "rle_from_string", "rle_to_string", "segmentation_mask"]


def rle_from_string(s: str | bytes) -> list[int]:
    """COCO's compressed RLE string -> the list of run lengths."""
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    counts: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                raise DataError(f"truncated COCO RLE string {data[:40]!r}...: check the 'counts' of the segmentation")
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_to_string(counts) -> str:
    """Run lengths -> COCO's compressed RLE string (the inverse of :func:`rle_from_string`)."""
    out = bytearray()
    counts = [int(c) for c in counts]
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(c + 48)
    return out.decode("ascii")


def decode_rle(rle: dict) -> np.ndarray:
    """``{"counts": list | str, "size": [h, w]}`` -> bool mask (h, w)."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"a COCO RLE needs 'counts' and 'size': [h, w], got {str(rle)[:80]}") from None
    runs = rle_from_string(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    runs = np.asarray(runs, np.int64)
    if (runs < 0).any() or runs.sum() != h * w:
        raise DataError(f"a COCO RLE of size {h}x{w} has runs summing to {int(runs.sum())}, not {h * w}: "
                        "the mask does not fit its 'size'")
    values = np.arange(len(runs)) % 2 == 1  # runs alternate 0, 1, 0, ...
    flat = np.repeat(values, runs)
    return flat.reshape(w, h).T.copy()  # column-major


def encode_rle(mask: np.ndarray) -> dict:
    """bool mask (h, w) -> uncompressed RLE ``{"counts": [...], "size": [h, w]}``."""
    h, w = mask.shape
    flat = np.asarray(mask, bool).T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(edges).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"counts": runs, "size": [h, w]}


def polygons_to_mask(polygons, h: int, w: int) -> np.ndarray:
    """COCO polygons (a list of flat ``[x, y, ...]`` lists) -> bool mask (h, w), their union.

    A pixel is inside a polygon when its centre is (even-odd rule; a centre on a left or top edge
    counts, on a right or bottom edge not), which is how pycocotools rasterises up to its 1/5-pixel
    rounding of the vertices.
    """
    out = np.zeros((h, w), bool)
    yc = np.arange(h, dtype=np.float64)[:, None] + 0.5  # (h, 1) pixel-centre rows
    for poly in polygons:
        pts = np.asarray(poly, np.float64).reshape(-1)
        if pts.size < 6 or pts.size % 2 or not np.isfinite(pts).all():
            raise DataError(f"a COCO polygon needs at least 3 (x, y) vertices as finite numbers, got {list(poly)[:8]}")
        x0, y0 = pts[0::2], pts[1::2]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        crosses = ((y0 <= yc) & (yc < y1)) | ((y1 <= yc) & (yc < y0))  # (h, E): half-open in y
        rows, edges = np.nonzero(crosses)
        t = (yc[rows, 0] - y0[edges]) / (y1[edges] - y0[edges])
        x = x0[edges] + t * (x1[edges] - x0[edges])
        # The first pixel whose centre is at or right of the crossing toggles inside/outside.
        cols = np.clip(np.ceil(x - 0.5), 0, w).astype(np.int64)
        toggles = np.zeros((h, w + 1), np.int64)
        np.add.at(toggles, (rows, cols), 1)
        out |= np.cumsum(toggles[:, :w], 1) % 2 == 1
    return out


def segmentation_mask(segmentation, h: int, w: int) -> np.ndarray:
    """Any COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> bool mask (h, w)."""
    if isinstance(segmentation, dict):
        mask = decode_rle(segmentation)
        if mask.shape != (h, w):
            raise DataError(f"a COCO RLE of size {mask.shape} on an image of {h}x{w}: the 'size' must be the image's")
        return mask
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, h, w)
    raise DataError(f"a COCO segmentation is a list of polygons or an RLE dict, got {type(segmentation).__name__}")
