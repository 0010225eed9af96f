"""Which task a dataset serves: the one rule every command uses.

:func:`detect_task` looks at names only (folder and file names, the header of a listing, the
keys of a COCO JSON), never at every file, so it is cheap on any dataset.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass

from ..errors import ConfigError, PathNotFoundError
from .dense_formats import (
    DENSE_LAYOUTS,
    DEPTH_LAYOUTS,
    dataset_root,
    find_depth_layout,
    find_segment_layout,
    list_names,
    subfolders,
)
from .det_formats import DETECT_LAYOUTS, coco_keys, find_detection_layout
from .trees import TAR_SUFFIXES
from .webdataset import expand_shards, shard_fields

TASKS = ("classify", "segment", "depth", "detect", "caption", "promptable", "generate")
_CAPTION_FIELDS = ("caption", "text", "captions")
_BUILTINS = {"shapes": ("classify",), "scenes": ("segment", "detect", "caption", "promptable"),
             "depth-scenes": ("depth",), "shapes-captions": ("caption",)}
_WORDS = {"classify": "classification", "segment": "segmentation", "depth": "depth estimation",
          "caption": "image-text pairs"}
CAPTION_LAYOUTS = ("a .jsonl or .csv whose rows have a 'caption', 'captions' or 'text' field (or a folder "
                    "holding one), or WebDataset shards of key.jpg + key.txt")


@dataclass
class TaskChoice:
    """The task a run trains (``task``, one of :data:`TASKS`) and why, in one sentence (``reason``)."""

    task: str
    reason: str


def _caption_listing(path: str) -> bool:
    """True when the first row of a .jsonl / .csv has a caption or text field (and so is not path,label)."""
    low = path.lower()
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if low.endswith(".jsonl"):
                line = next((ln for ln in f if ln.strip()), "")
                row = json.loads(line) if line else {}
                keys = row.keys() if isinstance(row, dict) else ()
            elif low.endswith(".csv"):
                keys = next(csv.reader(f), [])
            else:
                return False
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return any(str(k).strip().lower() in _CAPTION_FIELDS for k in keys)


def _detect_signal(root: str) -> str | None:
    """Where the detection annotations are, or None; the note when two formats describe the images."""
    layout = find_detection_layout(root)
    if layout is None:
        return None
    return layout.where + (f" ({layout.note})" if layout.note else "")


def _coco_masks(root: str) -> bool:
    files = [os.path.join(root, n) for n in list_names(root) if n.lower().endswith(".json")]
    ann = subfolders(root).get("annotations")
    if ann:
        files += [os.path.join(root, ann, n) for n in list_names(os.path.join(root, ann)) if n.lower().endswith(".json")]
    return any((c := coco_keys(f)) and c["masks"] for f in files)


def caption_listings(root: str) -> list[str]:
    """The .jsonl / .csv files directly in ``root`` whose rows carry captions, sorted by name."""
    return [os.path.join(root, n) for n in list_names(root)
            if n.lower().endswith((".jsonl", ".csv")) and _caption_listing(os.path.join(root, n))]


def caption_shards(path: str) -> list[str]:
    """The WebDataset shards at ``path`` (a tar, a brace pattern or a folder of tars) when their
    samples pair an image with a ``.txt`` caption; else an empty list."""
    try:
        if "{" in path and ".." in path and not os.path.exists(path):
            shards = expand_shards(path)
        elif os.path.isdir(path):
            shards = [os.path.join(path, n) for n in list_names(path) if n.lower().endswith(TAR_SUFFIXES)]
        else:
            shards = [path] if path.lower().endswith(TAR_SUFFIXES) else []
        return shards if shards and "txt" in shard_fields(shards[0]) else []
    except (OSError, ValueError):  # missing or corrupt shards: the reader says what is wrong
        return []


def _caption_signal(root: str) -> str | None:
    if found := caption_listings(root):
        return f"captions in {os.path.basename(found[0])}"
    if shards := caption_shards(root):
        return f"WebDataset shards with .txt captions ({len(shards)} in {os.path.basename(root) or root})"
    return None


def _found(path: str) -> dict[str, str]:
    """Every task the data at ``path`` can serve -> the sentence that says why."""
    if os.path.isfile(path):
        low = path.lower()
        if low.endswith(".json"):
            c = coco_keys(path) or {}
            return {**({"detect": "COCO boxes in the JSON: detection"} if c.get("boxes") else {}),
                    **({"promptable": "COCO masks in the JSON"} if c.get("masks") else {})}
        if _caption_listing(path):
            return {"caption": f"rows with a caption field in {os.path.basename(path)}: captioning"}
        if caption_shards(path):
            return {"caption": f"WebDataset samples with .txt captions in {os.path.basename(path)}: captioning"}
        return {"classify": "a listing or archive of labelled images: classification"}
    root = dataset_root(path)
    found = {}
    if sig := _detect_signal(root):
        found["detect"] = f"{sig}: detection"
        if _coco_masks(root):
            found["promptable"] = "COCO masks beside the boxes"
    if seg := find_segment_layout(path):
        found["segment"] = f"{seg.where}: segmentation ({seg.format} layout)"
    if dep := find_depth_layout(path):
        found["depth"] = f"{dep.where}: depth estimation"
    if sig := _caption_signal(root):
        found["caption"] = f"{sig}: captioning"
    return found


def detect_task(path: str, task: str | None = None) -> TaskChoice:
    """The task to train on the data at ``path``: ``task`` when given, else detected.

    Precedence without ``task``: detection data (a COCO JSON with boxes, or VOC XML in
    ``Annotations/``, beside the images or in a folder next to them; where both are there the
    COCO JSON is read and the reason says so) -> ``detect``; mask folders -> ``segment``;
    depth folders -> ``depth``;
    a caption listing (JSONL/CSV rows with a caption/text field) or WebDataset shards of
    image + ``.txt`` -> ``caption`` (shards with both ``.cls`` and ``.txt``: pass ``--task classify``
    to train on the labels); anything else
    (class folders and every format :func:`~vitkit.data.build_dataset` reads) -> ``classify``.
    COCO masks with prompts serve ``promptable`` only when asked. Built-ins: ``shapes`` ->
    classify, ``scenes`` -> segment (also detect, caption, promptable when asked),
    ``depth-scenes`` -> depth, ``shapes-captions`` -> caption.

    Raises:
        PathNotFoundError: ``task`` is a dense, detection or caption task and nothing is at ``path``.
        ConfigError: ``task`` is not one of :data:`TASKS`, or the data cannot serve it, or the
            layout serves two tasks equally (a VOC root with both ``SegmentationClass/`` and
            ``Annotations/``): pass ``--task``.
    """
    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    path = str(path)
    name = path.partition(":")[0]
    if name in _BUILTINS and not os.path.exists(path):
        serves = _BUILTINS[name]
        if task is None:
            return TaskChoice(serves[0], f"the built-in {name} set: {_WORDS[serves[0]]}")
        if task not in serves:
            raise ConfigError(f"the built-in {name} data serves {', '.join(serves)}, not task {task!r}")
        return TaskChoice(task, f"--task {task} on the built-in {name} data")
    if not os.path.exists(path) and (task in (None, "caption")) and caption_shards(path):
        return TaskChoice("caption", f"WebDataset shards {os.path.basename(path)} with .txt captions: captioning")
    if not os.path.exists(path):
        # Shard patterns and missing paths: classification's reader explains what it expected.
        if task not in (None, "classify"):
            raise PathNotFoundError(f"no such file or folder: {path!r}; check the path (task {task!r})")
        return TaskChoice("classify", "not a dense, detection or caption layout: classification")
    found = _found(path)
    if task is not None:
        if task == "classify" or task in found:
            return TaskChoice(task, f"--task {task}" + (f" ({found[task]})" if task in found else ""))
        layouts = {"segment": DENSE_LAYOUTS, "depth": DEPTH_LAYOUTS, "detect": DETECT_LAYOUTS,
                   "caption": CAPTION_LAYOUTS, "promptable": "a COCO JSON with segmentation masks"}[task]
        what = {"segment": "no masks", "depth": "no depth maps", "detect": "no boxes", "caption": "no captions",
                "promptable": "no COCO masks"}[task]
        raise ConfigError(f"--task {task}: {what} found at {path}; the layouts read are {layouts}")
    for a, b in (("detect", "segment"), ("segment", "depth")):
        if a in found and b in found:
            raise ConfigError(f"{path} holds both {found[a].rsplit(':', 1)[0]} and {found[b].rsplit(':', 1)[0]}; "
                              f"say which to train with --task {a} or --task {b} (data.task=...)")
    for t in ("detect", "segment", "depth", "caption"):
        if t in found:
            return TaskChoice(t, found[t])
    return TaskChoice("classify", "class folders or a classification format: classification")
