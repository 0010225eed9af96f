"""What a dataset path may be, and which names in it are never data.

System files (macOS ``._x`` twins and ``__MACOSX/``, ``.DS_Store``, ``Thumbs.db``,
``desktop.ini``, ``.ipynb_checkpoints/`` and every other hidden name) are never data:
:func:`is_system_path` filters them out of folders, tars, listings and shards.
"""

from __future__ import annotations

import os

SUPPORTED = (
    "'shapes[:N]', a class-folder tree (root/train/<class>/..., root/val/<class>/... or root/<class>/...), "
    "a .tar/.tar.gz/.tgz of such a tree, CIFAR-10/100 python batches, MNIST/Fashion-MNIST IDX files, "
    "a .csv or .jsonl of path,label, or WebDataset shards (.tar with key.jpg + key.cls, 'shards-{000..009}.tar', "
    "or a folder of shards)"
)
_SYSTEM_NAMES = {"__macosx", "thumbs.db", "desktop.ini", "ehthumbs.db"}


def is_system_path(relpath: str) -> bool:
    """True if any component of a ``/``-separated path is hidden (``.x``, ``._x``) or OS clutter."""
    return any(p.startswith(".") and p not in (".", "..") or p.lower() in _SYSTEM_NAMES
               for p in relpath.replace(os.sep, "/").split("/") if p)
