"""Finding and reading detection annotations: COCO JSON and Pascal VOC XML.

:func:`find_detection_layout` looks at names only; :func:`read_coco` / :func:`read_voc` parse
the annotations into one :class:`~vitkit.data.det_annotations.Record` per image (boxes xyxy in
pixels, class indices 0..C-1), bad annotations cleaned as :mod:`.det_annotations` says; an
image whose file is missing (or whose VOC XML cannot be parsed) is left out.

Layouts: COCO ``instances_{train,val}*.json`` in ``annotations/`` or the folder itself (one
JSON: split by a seeded fraction); Pascal VOC ``Annotations/`` + ``JPEGImages/`` with
``ImageSets/Main/{train,val}.txt``, or XML files beside the images or in a folder next to
``images/``, split by ``{train,val}.txt`` where the folder has them.

COCO: ``bbox`` is ``[x, y, w, h]``; crowd annotations (``iscrowd: 1``) are left out, as DETR's
reference loader does; categories sorted by id become classes 0..C-1 (``category_ids`` maps
back). Pascal VOC: the devkit's pixel indices are 1-based and inclusive, so ``xmin``/``ymin``
move by -1 (as Detectron2 reads them), unless some box starts at 0 (a file written 0-based).
Classes come from ``classes.txt`` when the folder has one, else the sorted object names;
objects marked ``difficult`` are kept as boxes to learn.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from .dense_formats import SPLIT_NAMES, _files, _read_classes, dataset_root, list_names, subfolders
from .det_annotations import Problems, Record, header_size, make_record
from .images import IMAGE_EXTENSIONS

DETECT_LAYOUTS = ("COCO JSON (annotations/instances_{train,val}.json, or one JSON split by a seeded fraction), "
                  "Pascal VOC (Annotations/ + JPEGImages/ + ImageSets/Main/{train,val}.txt, or XML files beside the "
                  "images or in a folder next to them)")
_IMAGE_DIRS = ("images", "jpegimages", "imgs", "img")


def coco_keys(path: str) -> dict | None:
    """Which annotation kinds a COCO-style JSON holds, found by its key names (streamed, not parsed:
    a COCO file can be hundreds of megabytes)."""
    keys = {b'"annotations"': False, b'"bbox"': False, b'"segmentation"': False}
    tail = b""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                block = tail + chunk
                for k in keys:
                    keys[k] = keys[k] or k in block
                if all(keys.values()):
                    break
                tail = block[-16:]
    except OSError:
        return None
    if not keys[b'"annotations"']:
        return None
    return {"boxes": keys[b'"bbox"'], "masks": keys[b'"segmentation"']}


@dataclass
class DetLayout:
    """Where a folder's detection annotations are: COCO JSON files by split (``"all"`` when one file
    is split by a seeded fraction) or VOC (image, XML) pairs, with the XML files of each split
    when the folder lists them."""

    format: str
    root: str
    where: str
    coco: dict[str, str] = field(default_factory=dict)
    voc_pairs: list[tuple[str | None, str]] = field(default_factory=list)
    voc_splits: dict[str, set] = field(default_factory=dict)
    note: str = ""


_SPLIT_WORDS = {w: s for s, words in SPLIT_NAMES.items() for w in words}


def _split_dirs(root: str) -> dict[str, str]:
    """"train"/"val" -> the folder of that split in ``root`` (``train/``, ``valid/`` ...)."""
    return {_SPLIT_WORDS[k]: os.path.join(root, d) for k, d in subfolders(root).items() if k in _SPLIT_WORDS}


def _json_files(root: str) -> list[str]:
    folders = [root] + [os.path.join(root, d) for k, d in subfolders(root).items() if k == "annotations"]
    folders += list(_split_dirs(root).values())  # one JSON per split folder (as Roboflow exports)
    found = [os.path.join(f, n) for f in folders for n in list_names(f)
             if n.lower().endswith(".json") and (c := coco_keys(os.path.join(f, n))) and c["boxes"]]
    # COCO's own annotation folders also hold person_keypoints_*.json with boxes: instances_* first.
    return sorted(found, key=lambda f: not os.path.basename(f).lower().startswith("instances"))


def _split_of(name: str) -> str | None:
    low = os.path.basename(name).lower()
    for split, words in SPLIT_NAMES.items():
        if any(w in low for w in words):
            return split
    return None


def _coco_files(root: str) -> dict[str, str]:
    files = _json_files(root)
    named = {}
    for f in files:
        s = _split_of(os.path.relpath(f, root).replace(os.sep, "_"))
        if s and s not in named:
            named[s] = f
    if "train" in named and "val" in named:
        return named
    if named.get("train"):
        return {"all": named["train"]}
    return {"all": files[0]} if files else {}


def _xml_folders(root: str) -> list[str]:
    """Folders that hold VOC-style XML files: ``root``, its ``Annotations/``, and, when it has an
    image folder, the folders beside it (a classification tree of many folders is not listed)."""
    dirs = subfolders(root)
    cands = [root] + [os.path.join(root, d) for k, d in dirs.items() if k == "annotations"]
    if any(k in dirs for k in _IMAGE_DIRS) and len(dirs) <= 16:
        cands += [os.path.join(root, d) for d in dirs.values()]
    return [f for f in dict.fromkeys(cands) if any(n.lower().endswith(".xml") for n in list_names(f))]


def _voc_split_folders(root: str) -> DetLayout | None:
    """XML beside the images in ``train/`` and ``val/`` (or ``valid/``) folders."""
    dirs = _split_dirs(root)
    if len(dirs) < 2 or not all(any(n.lower().endswith(".xml") for n in list_names(d)) for d in dirs.values()):
        return None
    pairs, splits = [], {}
    for s, d in sorted(dirs.items()):
        xmls, images = _files(d, (".xml",)), _files(d, IMAGE_EXTENSIONS)
        pairs += [(images.get(k), x) for k, x in sorted(xmls.items())]
        splits[s] = set(xmls.values())
    names = " and ".join(f"{os.path.basename(d)}/" for _, d in sorted(dirs.items()))
    return DetLayout("voc", root, f"Pascal VOC boxes in XML files beside the images in {names}", voc_pairs=pairs,
                     voc_splits=splits)


def _voc(root: str) -> DetLayout | None:
    if layout := _voc_split_folders(root):
        return layout
    dirs = subfolders(root)
    xml_dirs = _xml_folders(root)
    if not xml_dirs:
        return None
    if "annotations" in dirs and os.path.join(root, dirs["annotations"]) in xml_dirs:
        xml_dir = os.path.join(root, dirs["annotations"])
    else:
        xml_dir = xml_dirs[0]
    xmls = _files(xml_dir, (".xml",))
    images: dict[str, str] = {}
    for f in [xml_dir, root] + [os.path.join(root, dirs[k]) for k in _IMAGE_DIRS if k in dirs]:
        for s, p in _files(f, IMAGE_EXTENSIONS).items():
            images.setdefault(s, p)
    if not set(xmls) & set(images) and os.path.basename(xml_dir).lower() != "annotations":
        return None  # XML files of something else (no image shares a name)
    splits = {}
    ann = [os.path.join(root, dirs["annotations"])] if "annotations" in dirs else []
    for f in [os.path.join(root, "ImageSets", "Main"), root, xml_dir, *ann]:
        files = {s: os.path.join(f, f"{s}.txt") for s in ("train", "val")}
        if all(os.path.isfile(p) for p in files.values()):
            for s, p in files.items():
                with open(p, encoding="utf-8") as fh:
                    splits[s] = {xmls[k] for line in fh if line.strip() and (k := line.split()[0]) in xmls}
            break
    rel = os.path.relpath(xml_dir, root)
    where = "Pascal VOC boxes in " + ("XML files beside the images" if rel == "." else f"{rel}/*.xml")
    return DetLayout("voc", root, where, voc_pairs=[(images.get(s), x) for s, x in sorted(xmls.items())],
                     voc_splits=splits)


def find_detection_layout(path: str) -> DetLayout | None:
    """The detection annotations at ``path`` (a folder, or one COCO JSON file), or None.

    Where a COCO JSON and VOC XML both describe the folder, the COCO JSON is read and
    ``note`` says so.
    """
    if os.path.isfile(path):
        c = coco_keys(path) if path.lower().endswith(".json") else None
        if not c or not c["boxes"]:
            return None
        return DetLayout("coco", os.path.dirname(os.path.abspath(path)), f"COCO boxes in {os.path.basename(path)}",
                         coco={"all": path})
    if not os.path.isdir(path):
        return None
    root = dataset_root(path)
    coco = _coco_files(root)
    voc = _voc(root)
    if not coco:
        return voc
    names = ", ".join(os.path.relpath(f, root) for f in coco.values())
    layout = DetLayout("coco", root, f"COCO boxes in {names}", coco=coco)
    if voc is not None:
        xml = voc.where.replace("Pascal VOC boxes in ", "")
        layout.note = f"the images also have Pascal VOC XML in {xml}; the COCO JSON is used"
    return layout


def _image_dir(root: str, json_path: str, files: list[str]) -> str:
    """The folder the ``file_name`` entries of a COCO JSON are relative to."""
    here = os.path.dirname(json_path)
    stem = os.path.splitext(os.path.basename(json_path))[0].lower().replace("instances_", "")
    cands = [here, root, os.path.dirname(here), os.path.join(root, "images")]
    cands += [os.path.join(r, d) for r in (root, os.path.join(root, "images"))
              for k, d in subfolders(r).items() if k == stem or k in SPLIT_NAMES.get(_split_of(stem) or "", ())]
    probe = files[:20]
    return max(cands, key=lambda c: sum(os.path.isfile(os.path.join(c, f)) for f in probe))


def read_coco(root: str, files: dict[str, str], problems: Problems):
    """Records per split key of ``files``, the class names and their COCO ids."""
    data = {}
    for key, f in files.items():
        try:
            with open(f, encoding="utf-8") as fh:
                data[key] = json.load(fh)
        except (OSError, ValueError) as e:
            raise DataError(f"{f}: cannot read the COCO JSON ({type(e).__name__}: {e}); check the file") from None
        if not isinstance(data[key], dict) or not isinstance(data[key].get("images"), list):
            raise DataError(f"{f}: not a COCO detection JSON (no 'images' list)")
    cats: dict[int, str] = {}
    for f, d in zip(files.values(), data.values()):
        for c in d.get("categories") or []:
            if not isinstance(c, dict) or not isinstance(c.get("id"), int):
                raise DataError(f"{f}: a category without an integer 'id': {c!r}")
            cats.setdefault(c["id"], str(c.get("name", c["id"])))
    ids = sorted(cats)
    index = {c: i for i, c in enumerate(ids)}
    out = {}
    for key, d in data.items():
        try:
            out[key] = _coco_records(root, files[key], d, index, problems)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{files[key]}: not a COCO detection JSON ({type(e).__name__}: {e}); images need "
                            "'id' and 'file_name', annotations 'image_id', 'category_id' and 'bbox'") from None
    return out, [cats[c] for c in ids], ids


def _parse_xml(path: str) -> tuple[str, tuple[int, int] | None, list[tuple[str, list]]]:
    root = ET.parse(path).getroot()
    size = None
    s = root.find("size")
    if s is not None:
        try:
            h, w = int(float(s.findtext("height", "0"))), int(float(s.findtext("width", "0")))
            size = (h, w) if h > 0 and w > 0 else None
        except ValueError:
            size = None
    objs = []
    for o in root.iter("object"):
        b = o.find("bndbox")
        try:
            coords = [float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError):
            coords = [np.nan] * 4
        objs.append(((o.findtext("name") or "").strip(), coords))
    return root.findtext("filename") or "", size, objs


def read_voc(layout: DetLayout, problems: Problems):
    """Records (image id = position among the sorted XML files + 1), class names and ids 1..C."""
    parsed = []
    for k, (img, xml) in enumerate(layout.voc_pairs):
        try:
            filename, size, objs = _parse_xml(xml)
        except (ET.ParseError, OSError) as e:
            problems.add("bad_xml", f"{xml} ({e})")
            continue
        if img is None and filename:
            cand = os.path.join(os.path.dirname(xml), filename)
            img = cand if os.path.isfile(cand) else None
        if img is None:
            problems.add("missing_image", xml)
            continue
        parsed.append((k + 1, img, xml, size or header_size(img), objs))
    classes = list(_read_classes(layout.root)) or sorted({n for *_, objs in parsed for n, _ in objs if n})
    index = {c: i for i, c in enumerate(classes)}
    # 1-based devkit indices move to pixel edges; a file with a box at 0 was written 0-based.
    one_based = not any(c[0] == 0 or c[1] == 0 for *_, objs in parsed for _, c in objs)
    recs = []
    for image_id, img, xml, size, objs in parsed:
        raw = [[c[0] - one_based, c[1] - one_based, c[2], c[3]] for _, c in objs]
        recs.append(make_record(img, raw, [index.get(n, -1) for n, _ in objs], image_id, size, problems, ann=xml))
    return recs, classes, list(range(1, len(classes) + 1)), one_based



def _coco_records(root: str, json_path: str, d: dict, index: dict[int, int], problems: Problems) -> list[Record]:
    images = d["images"]
    folder = _image_dir(root, json_path, [str(im.get("file_name", "")) for im in images])
    anns: dict[int, list] = {}
    known_ids = {im["id"] for im in images}
    for a in d.get("annotations") or []:
        if a.get("iscrowd", 0):
            continue
        if a.get("image_id") not in known_ids:
            problems.add("unknown_image", f"image id {a.get('image_id')}", image=False)
            continue
        anns.setdefault(a["image_id"], []).append(a)
    recs = []
    for im in images:
        name = str(im.get("file_name", ""))
        path = os.path.join(folder, name)
        if not name or not os.path.isfile(path):
            problems.add("missing_image", name or f"image id {im['id']}")
            continue
        size = (int(im["height"]), int(im["width"])) if im.get("height") and im.get("width") else None
        raw, cat = [], []
        for a in anns.get(im["id"], []):
            b = a.get("bbox")
            ok = isinstance(b, list | tuple) and len(b) == 4 and all(isinstance(v, int | float) for v in b)
            x, y, w, h = (float(v) for v in b) if ok else (np.nan,) * 4
            raw.append((x, y, x + w, y + h))
            cat.append(index.get(a.get("category_id"), -1))
        recs.append(make_record(path, raw, cat, int(im["id"]), size or header_size(path), problems))
    return recs
