"""The decode-once store (vitkit.data.store): each stored image against PIL's own decoding and
resizing of the file, the memory-mapped cache (read back without decoding, a corrupt, truncated or
foreign file rebuilt, a changed file missing it), the size rule, the too-large fallback, broken
files replaced as the loader replaces them, and the store's loader against the workers' batches."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from helpers import write_class_folder
from PIL import Image

from vitkit.data import ImageDataset, ResumableSampler, ShapesDataset, build_dataset, build_loader
from vitkit.data.loader import StoreLoader
from vitkit.data.store import fingerprint, open_store, read_cache, source_size, store_bytes
from vitkit.data.transforms import SourceTransform

SIZE = (24, 24)


@pytest.fixture
def root(tmp_path):
    """A train/val class tree of 24 px PNGs, plus a 30x20 colour image and a 17x26 grayscale one in train/."""
    root = tmp_path / "ds"
    write_class_folder(root / "train", per_class=3)
    write_class_folder(root / "val", per_class=1, seed=1)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(root / "train" / "b" / "odd.png")
    Image.fromarray(rng.integers(0, 256, (17, 26), dtype=np.uint8), "L").save(root / "train" / "c" / "gray.png")
    return root


def _train(root) -> ImageDataset:
    return build_dataset(str(root), "train")


def _reference(path: str) -> tuple[np.ndarray, tuple[int, int]]:
    """PIL alone: the file as RGB, resized bicubic to SIZE when it has another size; and its (h, w)."""
    img = Image.open(path).convert("RGB")
    hw = (img.height, img.width)
    if hw != SIZE:
        img = img.resize((SIZE[1], SIZE[0]), Image.Resampling.BICUBIC)
    return np.asarray(img).transpose(2, 0, 1), hw


def _same(a, b) -> None:
    assert torch.equal(a.images, b.images) and torch.equal(a.orig_hw, b.orig_hw) and torch.equal(a.labels, b.labels)


def test_store_holds_each_image_as_pil_decodes_and_resizes_it(root):
    ds = _train(root)
    store = open_store(ds, SIZE, mode="memory")
    assert store.images.shape == (len(ds), 3, *SIZE) and store.images.dtype == torch.uint8
    sizes = set()
    for i in range(len(ds)):
        pixels, hw = _reference(ds.source.name(ds.indices[i]))
        sizes.add(hw)
        np.testing.assert_array_equal(store.images[i].numpy(), pixels)
        assert tuple(store.orig_hw[i].tolist()) == hw and int(store.labels[i]) == ds.targets[i]
    assert sizes == {(24, 24), (30, 20), (17, 26)}  # resized and as-is images both checked
    assert store.bad == {} and int(store.skipped.sum()) == 0
    assert store.nbytes == store_bytes(len(ds), 3, SIZE) == len(ds) * (3 * 24 * 24 + 24)


def test_mmap_store_is_read_back_without_decoding(root, tmp_path, monkeypatch):
    ds = _train(root)
    ref = open_store(ds, SIZE, mode="memory")
    lines: list[str] = []
    built = open_store(ds, SIZE, mode="mmap", cache_dir=tmp_path / "cache", log=lines.append)
    files = list((tmp_path / "cache").iterdir())
    assert [f.name for f in files] == [built.path.name] and built.path.name.startswith("decoded-")
    assert lines[-1].startswith(f"decoded {len(ds)} training images at 24x24 once into ")
    _same(built, ref)

    def no_decoding(i):
        raise AssertionError("the cache was decoded again")

    monkeypatch.setattr(ds, "load", no_decoding)
    again = open_store(ds, SIZE, mode="mmap", cache_dir=tmp_path / "cache", log=lines.append)
    assert lines[-1].startswith(f"read {len(ds)} training images at 24x24, decoded, from ")
    _same(again, ref)


def _flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("damage, why", [
    ("payload", "corrupt (checksum mismatch)"),
    ("truncate", "truncated"),
    ("header", "not a vitkit store (bad header)"),
    ("description", "corrupt description"),
])
def test_damaged_cache_is_detected_and_rebuilt(root, tmp_path, damage, why):
    ds = _train(root)
    ref = open_store(ds, SIZE, mode="memory")
    path = open_store(ds, SIZE, mode="mmap", cache_dir=tmp_path / "cache").path
    key = fingerprint(ds, SIZE)
    size = path.stat().st_size
    if damage == "payload":
        _flip_byte(path, 4096 + 3 * 24 * 24 + 5)  # a pixel of the second image
    elif damage == "truncate":
        os.truncate(path, size - 10)
    elif damage == "header":
        _flip_byte(path, 2)  # the magic
    else:
        _flip_byte(path, size - 2)  # inside the JSON description, at the end of the file
    assert read_cache(path, key) == (None, why)
    lines: list[str] = []
    rebuilt = open_store(ds, SIZE, mode="mmap", cache_dir=tmp_path / "cache", log=lines.append)
    assert lines[-1].startswith(f"rebuilt the cache ({why}): {len(ds)} training images"), lines
    assert rebuilt.path == path and read_cache(path, key)[1] == ""
    _same(rebuilt, ref)


def test_changed_data_gets_a_new_cache(root, tmp_path):
    ds = _train(root)
    key = fingerprint(ds, SIZE)
    assert fingerprint(_train(root), SIZE) == key  # the same files, opened again
    assert fingerprint(ds, (32, 32)) != key
    gray = _train(root)
    gray.in_chans = 1
    assert fingerprint(gray, SIZE) != key
    first = open_store(ds, SIZE, mode="mmap", cache_dir=tmp_path / "cache")
    # Rewrite one training image with other pixels (and a later mtime, whatever the clock's resolution).
    target = ds.source.name(ds.indices[0])
    Image.fromarray(np.full((24, 24, 3), 7, dtype=np.uint8)).save(target)
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    lines: list[str] = []
    second = open_store(_train(root), SIZE, mode="mmap", cache_dir=tmp_path / "cache", log=lines.append)
    assert second.path != first.path and lines[-1].startswith("decoded ")
    assert (second.images[0] == 7).all() and not (first.images[0] == 7).all()


def test_fingerprints_of_generated_and_unknown_sources(tmp_path):
    a, b = ShapesDataset(n=8, img_size=16, seed=0), ShapesDataset(n=8, img_size=16, seed=1)
    assert fingerprint(a, (16, 16)) is not None and fingerprint(a, (16, 16)) != fingerprint(b, (16, 16))

    class Listed:  # holds a list (paths, say): no way to tell that its items changed
        def __init__(self):
            self.items = [np.full((4, 4, 3), k, dtype=np.uint8) for k in range(3)]

        def __len__(self):
            return 3

        def name(self, j):
            return f"item{j}"

        def image(self, j, in_chans):
            return Image.fromarray(self.items[j])

    ds = ImageDataset(Listed(), [0, 1, 0], ["x", "y"])
    assert fingerprint(ds, (4, 4)) is None
    lines: list[str] = []
    store = open_store(ds, (4, 4), mode="mmap", cache_dir=tmp_path / "cache", log=lines.append)
    assert store.path is None and "no fingerprint" in lines[0] and "into memory" in lines[1]
    assert not (tmp_path / "cache").exists()
    assert store.images[:, 0, 0, 0].tolist() == [0, 1, 2]


def test_source_size_rule():
    assert source_size((32, 32), 32) == (32, 32)  # CIFAR at its own size: stored as decoded
    assert source_size((28, 28), 32) == (28, 28)  # smaller than the model's input: never upsampled
    assert source_size((375, 500), 224) == (375, 500)  # short side within 2 x 224
    assert source_size((1000, 1500), 224) == (448, 672)  # short side capped at 448
    assert source_size((3000, 600), 64) == (640, 128)


def test_too_large_store_falls_back_with_one_line(root):
    ds = _train(root)
    need = store_bytes(len(ds), 3, SIZE)
    lines: list[str] = []
    out = open_store(ds, SIZE, mode="memory", max_bytes=need - 1, limit_why="data.store_max_gb=1e-05", log=lines.append)
    assert out is None and len(lines) == 1
    assert f"need {need / 1e6:.1f} MB decoded, more than" in lines[0] and "data.store_max_gb=1e-05" in lines[0]
    assert lines[0].endswith("decoding them every epoch instead")
    assert open_store(ds, SIZE, mode="memory", max_bytes=need) is not None  # exactly at the limit: built


def test_unreadable_file_is_stored_as_the_loaders_stand_in(root):
    (root / "train" / "a" / "zz_broken.png").write_bytes(b"not a picture")
    ds = _train(root)
    n = len(ds)
    bad = next(i for i in range(n) if ds.source.name(ds.indices[i]).endswith("zz_broken.png"))
    # first_readable's rule, by hand: attempt k > 0 reads the pseudo-random item Random(f"{i}:{k}").randrange(n).
    tries = [bad]
    while tries[-1] == bad:
        tries.append(random.Random(f"{bad}:{len(tries)}").randrange(n))
    stand_in, failures = tries[-1], len(tries) - 1
    store = open_store(ds, SIZE, mode="memory")
    assert torch.equal(store.images[bad], store.images[stand_in])
    assert int(store.labels[bad]) == ds.targets[stand_in] and int(store.skipped[bad]) == failures
    assert list(store.bad) == [bad] and all("zz_broken.png" in line for line in store.bad[bad])

    loader = StoreLoader(store, ds, batch_size=n, sampler=ResumableSampler(n, shuffle=False), drop_last=False,
                         max_bad_fraction=0.5)
    (batch,) = list(loader)
    assert int(batch["skipped"].sum()) == int(batch["skipped"][bad]) == failures
    assert loader.skips.skipped == 1 and "zz_broken.png" in loader.skips.bad_files[0]  # one file, counted once


def test_store_loader_gives_the_workers_batches_in_the_sampler_order(root):
    """The store's batches equal those of workers running SourceTransform on the files, in the same
    order; a resumed sampler yields the rest of the epoch."""
    ds = _train(root)
    n, bs = len(ds), 4
    store = open_store(ds, SIZE, mode="memory")
    loader = build_loader(ds, bs, train=True, transform=None, sampler=ResumableSampler(n, seed=3), store=store)
    workers = build_loader(ds, bs, train=True, transform=SourceTransform(SIZE), sampler=ResumableSampler(n, seed=3))
    assert isinstance(loader, StoreLoader) and len(loader) == len(workers) == n // bs
    loader.set_epoch(1)
    workers.set_epoch(1)
    order = ResumableSampler(n, seed=3)
    order.set_epoch(1)
    chunks = [order.indices()[k:k + bs] for k in range(0, n - bs + 1, bs)]
    got = list(loader)
    assert [b["index"].tolist() for b in got] == chunks
    for a, b in zip(got, workers):
        for key in ("image", "orig_hw", "label", "index", "skipped"):
            assert torch.equal(a[key], b[key]), key
    resumed = ResumableSampler(n, seed=3)
    resumed.load_state_dict({"epoch": 1, "position": bs})
    rest = StoreLoader(store, ds, bs, resumed, drop_last=True)
    assert [b["index"].tolist() for b in rest] == chunks[1:]
