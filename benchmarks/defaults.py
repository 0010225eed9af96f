"""No-flag defaults against an independent, searched hand-set recipe and ResNet-18, under the same budget.

Five rows, each a different shape of problem:

- ``shapes``: vitkit's procedural shapes, 10,000 training images at 64 px, scored on its
  2,000-image val stream (it has no test split);
- ``fashion-mnist``: the shared IDX files, 60,000 training images (28 px, grayscale), scored on
  the 10,000 test images (``t10k``);
- ``cifar10``: the shared JPEG tar read directly, 50,000 training images, the 10,000 test images;
- ``cifar10-2class``: cat vs dog, 500 training images of each drawn (seeded) from CIFAR-10's
  training set, scored on the 2,000 test images of the two: few images, two classes. Cat and dog
  are the two classes with the lowest test accuracy (58% and 65%) of the 30-minute
  ``cifar10_fast`` run that pretrained the PEFT benchmark's backbone, so the pair is not trivial;
- ``fashion-lt``: 5,000 Fashion-MNIST training images, long-tailed 10:1 (images per class fall
  geometrically from the first class to the last, as in the long-tailed CIFAR of Cui et al.,
  2019), scored by **balanced accuracy** (the mean of the per-class recalls) on test images drawn
  with the same profile (its largest class at all 1,000 of its test images): held-out data
  distributed like the training data, as a user's own split would be.

The built sets (and the screening sets below) are written once into
``~/.cache/vitkit-bench/defaults/`` (``VITKIT_BENCH_CACHE``) from ``../shared/datasets``; vitkit
reads an IDX folder's ``t10k`` files and a tree's ``test/`` folder as the run's val split.

Per row, every run a fresh ``vitkit train`` process (imports, scan, calibration and evaluation
all count):

1. **no-flag**: ``vitkit train --data PATH --out DIR``, nothing else. On the built-in shapes
   data that is the ``shapes_quick`` recipe, elsewhere the data-aware plan, which picks its own
   budget on a CPU; ``budget_s`` is the plan's ``engine.time_budget`` (shapes: the run's wall time).
2. **hand-set search**: the four configurations of ``SEARCH`` (a conv-stem nano ViT, two AdamW
   learning rates x light or DeiT-strength augmentation; written out as recipes in
   ``RUN_ROOT/recipes/``), each screened for ``min(3 min, budget_s)`` on the screening set: the
   row's training images only, a stratified fifth of every class held out as its val split
   (shapes: other images, ``engine.seed=1``, for both). The best screening score wins (a tie goes
   to the earlier configuration), and only that one is re-run on the row's data for the full
   budget. Nothing is chosen on the test split.
3. **ResNet-18** (``RESNET18``; the registry's, with the ImageNet stem, so a 32 px image ends as a
   1x1 map: what a timm user gets without changing the network), trained from scratch under the
   full budget with the recipe that user would set: SGD with momentum 0.9 (vitkit's has no Nesterov option; timm's has), lr 0.1
   per 256 images scaled linearly with the batch (Goyal et al., 2017; timm's ``--lr-base``),
   weight decay 5e-4 (the usual ResNet value for 32 px data), cosine schedule with a half-epoch
   warm-up, label smoothing 0.1, random-resized crops of at least 35% of the image (timm's 8% is
   for 224 px photos) and flips, flip averaging at evaluation as in the hand-set runs.

Hand-set and ResNet-18 runs train at 32 px (``shapes``: 64 px), with ``engine.epochs`` and
``engine.eval_every`` set past any run so that the budget alone ends them, evaluated once at
the end. Accuracy is the run's final weights on the row's test split (``summary.json``: top-1,
or the balanced accuracy computed here from the per-class counts). The no-flag run evaluates
the same split as its val split, and a plateau stop the plan sets reads it: that is the only
choice the test split enters, and it is the plan's, as a user's run would make it.

Time plan on 2 CPU cores, per row ``3 x budget + 4 x min(3 min, budget)`` plus ~20 s of startup
per process: shapes ~2 min budget (14 min), fashion-mnist 12 min (48), cifar10 10 min (42),
cifar10-2class 10 min (42), fashion-lt 10 min (42): about 3 h 10 min, plus a few minutes to
build the data once. ``--run-root`` keeps every stage (a finished one is reused by name: delete
its folder to re-run it), so the rows can be run over several quiet sessions; rows in the new
format already in the results file are kept unless re-run.

Writes results/defaults.json: ``{"rows": [{dataset, acc_default, acc_handset, acc_resnet18,
ratio, wall_s, budget_s, search, ...}], ...}`` plus the recipes, the machine and versions.

    python benchmarks/defaults.py --run-root runs/defaults              # everything (~3 h 10 min)
    python benchmarks/defaults.py --run-root runs/defaults --rows fashion-lt cifar10-2class
    python benchmarks/defaults.py --smoke                               # the pipeline in < 1 min, to /tmp
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from generate_fashion import FASHION, read_split, stage, write_idx
from segment_camvid import CACHE, SHARED

import vitkit
from vitkit.data.splits import stratified_split
from vitkit.engine.budget import parse_duration

from _common import RESULTS, machine, versions, write_json

REPO = Path(__file__).resolve().parents[1]
CIFAR = SHARED / "cifar10-jpg.tar.gz"
BUILD = CACHE / "defaults"
SEED = 0
SCREEN_S = 180.0  # the screening budget (or the row's budget, if shorter)
SCREEN_HOLDOUT = 0.2  # of each class, the screening set's val split: 200 images on the smallest row
NO_CAP = 1_000_000  # engine.epochs / eval_every past any run: the budget ends it, evaluated at its end
PAIR, PAIR_PER_CLASS = ("cat", "dog"), 500
LT_TOTAL, LT_RATIO = 5000, 10.0
ROW_KEYS = ("dataset", "acc_default", "acc_handset", "acc_resnet18", "ratio", "wall_s", "budget_s", "search")


@dataclass(frozen=True)
class Row:
    name: str
    metric: str  # "acc" (top-1) or "balanced_acc" (the mean of the per-class recalls)
    img_size: int  # the hand-set and ResNet-18 resolution
    about: str


ROWS = {r.name: r for r in (
    Row("shapes", "acc", 64, "vitkit shapes, 10,000 training images at 64 px; its 2,000-image val stream"),
    Row("fashion-mnist", "acc", 32, "Fashion-MNIST, 60,000 training images; the 10,000 test images"),
    Row("cifar10", "acc", 32, "CIFAR-10 JPEGs, 50,000 training images; the 10,000 test images"),
    Row("cifar10-2class", "acc", 32, f"CIFAR-10 {' vs '.join(PAIR)}, {PAIR_PER_CLASS} training images of each; "
        "the 2,000 test images of the two"),
    Row("fashion-lt", "balanced_acc", 32, f"Fashion-MNIST, {LT_TOTAL:,} training images long-tailed "
        f"{LT_RATIO:g}:1; test images with the same profile, balanced accuracy"),
)}

# ---- the hand-set search and the ResNet-18 recipe ------------------------------------------------

_ENGINE = {"channels_last": True, "epochs": NO_CAP, "eval_every": NO_CAP, "log_every": 50,
           "tensorboard": False, "plots": False}
# A user's from-scratch recipe for small images: the shipped cifar10_fast's model and schedule.
HANDSET_BASE = {
    "data": {"batch_size": 128, "crop_pct": 1.0, "hflip": 0.5, "label_smoothing": 0.1},
    "model": {"name": "vit_nano_convstem_patch8_64", "args": {"stem_width": 192}},
    "optim": {"name": "adamw", "weight_decay": 0.05},
    "schedule": {"name": "onecycle", "warmup_epochs": 0.5},
    "engine": _ENGINE,
    "objective": {"name": "supervised", "tta": "hflip"},
}
LIGHT = {"data": {"scale_min": 0.5, "auto_augment": None, "re_prob": 0.0, "mixup": 0.0, "cutmix": 0.0},
         "model": {"drop_path_rate": 0.0}}
# DeiT's augmentation (vitkit's DataConfig defaults), crops of at least 35% as deit_tiny_cifar10 sets for 32 px.
STRONG = {"data": {"scale_min": 0.35, "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "mixup": 0.8,
                   "cutmix": 1.0}, "model": {"drop_path_rate": 0.1}}
# AdamW lr per 512 images: half and 1.7x the shipped recipe's 6e-3, a factor 3.3 apart.
SEARCH = {f"{aug}-lr{lr:g}": [HANDSET_BASE, parts, {"optim": {"lr": lr}}]
          for aug, parts in (("light", LIGHT), ("strong", STRONG)) for lr in (3e-3, 1e-2)}
RESNET18 = {
    "data": {"batch_size": 128, "crop_pct": 1.0, "hflip": 0.5, "scale_min": 0.35, "auto_augment": None,
             "re_prob": 0.0, "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.1},
    "model": {"name": "resnet18", "drop_path_rate": 0.0},
    "optim": {"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4},  # lr per 512 = 0.1 per 256
    "schedule": {"name": "cosine", "warmup_epochs": 0.5},
    "engine": _ENGINE,
    "objective": {"name": "supervised", "tta": "hflip"},
}

# --smoke: a 64-image shapes set, three steps a run, one-second-scale budgets
SMOKE_SHAPES = "shapes:64"
SMOKE_ARGS = ["engine.max_steps=3", "data.num_workers=0"]
SMOKE_RECIPE_ARGS = [*SMOKE_ARGS, "data.batch_size=16"]
SMOKE_SCREEN_S = 3.0
SMOKE_ROOT = Path("/tmp/defaults-smoke")


def recipe(parts: list[dict] | dict) -> dict:
    """The recipe the parts make, later ones winning key by key (OmegaConf's deep merge)."""
    from omegaconf import OmegaConf

    parts = parts if isinstance(parts, list) else [parts]
    return OmegaConf.to_container(OmegaConf.merge(*[OmegaConf.create(p) for p in parts]))


def recipe_file(root: Path, name: str, parts: list[dict] | dict) -> Path:
    """``root/recipes/NAME.yaml``, what ``vitkit train --recipe`` reads (rewritten each time: it is the record)."""
    from omegaconf import OmegaConf

    path = root / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(recipe(parts))))
    return path


# ---- building the data ----------------------------------------------------------------------------


def _once(dest: Path, make: Callable[[Path], None]) -> Path:
    """``dest`` (a file or a folder), made by ``make(tmp)`` once and renamed into place, so an interrupted
    build is never taken for a finished one."""
    if dest.exists():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    tmp.unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    make(tmp)
    tmp.rename(dest)
    return dest


def longtail_counts(n_classes: int, ratio: float, total: int) -> list[int]:
    """Images per class falling geometrically from the first class to the last, ``ratio`` times fewer
    (``n_c`` proportional to ``ratio ** (-c / (C - 1))``, Cui et al., 2019), summing to ``total``
    (largest-remainder rounding)."""
    w = ratio ** (-np.arange(n_classes) / (n_classes - 1))
    raw = total * w / w.sum()
    counts = np.floor(raw).astype(np.int64)
    for i in np.argsort(-(raw - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


def longtail_total(n_classes: int, ratio: float, n_first: int) -> int:
    """The largest total whose :func:`longtail_counts` profile gives the first class a share (before rounding)
    of at most ``n_first``, so that it never asks for more images than a class has."""
    return int(n_first * (ratio ** (-np.arange(n_classes) / (n_classes - 1))).sum())


def pick_counts(labels: np.ndarray, counts: list[int], rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of ``counts[c]`` items of each class ``c``, drawn without replacement with ``rng``."""
    keep = []
    for c, n in enumerate(counts):
        pool = np.flatnonzero(np.asarray(labels) == c)
        if len(pool) < n:
            raise SystemExit(f"class {c} has {len(pool)} images, {n} are needed")
        keep.append(rng.choice(pool, n, replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def _write_idx_split(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


def longtail_idx(src: Path, dest: Path, total: int = LT_TOTAL, ratio: float = LT_RATIO,
                 test_first: int | None = None, seed: int = SEED) -> Path:
    """IDX files under ``dest`` (keep "fashion" in its name: vitkit names Fashion-MNIST's classes from
    it): ``total`` training images of ``src`` in the :func:`longtail_counts` profile, and test images in
    the same profile with ``test_first`` of the first class (None: all the test set has of a class)."""
    def make(tmp: Path) -> None:
        about = {"from": str(src), "ratio": ratio, "seed": seed}
        for prefix in ("train", "t10k"):
            images, labels = read_split(src, prefix)
            k = int(labels.max()) + 1
            n = total if prefix == "train" else longtail_total(
                k, ratio, test_first or int(np.bincount(labels, minlength=k).min()))
            counts = longtail_counts(k, ratio, n)
            keep = pick_counts(labels, counts, np.random.default_rng([seed, int(prefix == "t10k")]))
            _write_idx_split(tmp, prefix, images[keep], labels[keep])
            about[prefix] = counts
        (tmp / "subset.json").write_text(json.dumps(about, indent=2) + "\n")

    return _once(dest, make)


def holdout_idx(src: Path, dest: Path, fraction: float = SCREEN_HOLDOUT, seed: int = SEED) -> Path:
    """The training images of the IDX set ``src`` only, split (stratified, seeded, as vitkit splits a
    folder) into ``train`` and a held-out ``t10k`` of ``fraction`` of each class: a screening set."""
    def make(tmp: Path) -> None:
        images, labels = read_split(src, "train")
        train, held = stratified_split(labels.tolist(), fraction, seed)
        _write_idx_split(tmp, "train", images[train], labels[train])
        _write_idx_split(tmp, "t10k", images[held], labels[held])

    return _once(dest, make)


def read_tree_tar(path: Path) -> dict[str, list[tuple[str, str, bytes]]]:
    """``{split: [(class, file name, bytes)]}`` of a class-tree tar (``[root/]split/class/file``), in tar order."""
    out: dict[str, list[tuple[str, str, bytes]]] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            parts = m.name.strip("/").split("/")
            if m.isfile() and len(parts) >= 3 and parts[-3].lower() in ("train", "val", "test"):
                out.setdefault(parts[-3].lower(), []).append((parts[-2], parts[-1], tf.extractfile(m).read()))
    return out


def write_tree_tar(path: Path, splits: dict[str, list[tuple[str, str, bytes]]]) -> None:
    """An uncompressed tar of ``split/class/file`` members (vitkit reads a ``.tar`` in place)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for split, items in splits.items():
            for cls, name, data in items:
                info = tarfile.TarInfo(f"{split}/{cls}/{name}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def pair_subset(src: Path, dest: Path, classes: tuple[str, ...] = PAIR, per_class: int = PAIR_PER_CLASS,
                seed: int = SEED) -> Path:
    """A tar of ``per_class`` training images of each of ``classes`` drawn from the tree tar ``src``, and
    all of their test images; the bytes are the source files' own (no re-encoding)."""
    def make(tmp: Path) -> None:
        tree = read_tree_tar(src)
        train = tree["train"]
        labels = np.array([classes.index(c) if c in classes else -1 for c, _, _ in train])
        keep = pick_counts(labels, [per_class] * len(classes), np.random.default_rng([seed, 2]))
        write_tree_tar(tmp, {"train": [train[i] for i in keep],
                             "test": [it for it in tree["test"] if it[0] in classes]})

    return _once(dest, make)


def holdout_tar(src: Path, dest: Path, fraction: float = SCREEN_HOLDOUT, seed: int = SEED) -> Path:
    """The training images of the tree tar ``src`` only, as ``train/`` and a held-out ``val/`` of
    ``fraction`` of each class (stratified, seeded): a screening set."""
    def make(tmp: Path) -> None:
        train = read_tree_tar(src)["train"]
        classes = sorted({c for c, _, _ in train})
        kept, held = stratified_split([classes.index(c) for c, _, _ in train], fraction, seed)
        write_tree_tar(tmp, {"train": [train[i] for i in kept], "val": [train[i] for i in held]})

    return _once(dest, make)


def row_data(name: str, build: Path = BUILD, fashion: Path = FASHION, cifar: Path = CIFAR,
             smoke: bool = False) -> tuple[str, str, list[str]]:
    """``(data, screening data, screening overrides)`` of a row, built into ``build`` once."""
    if name == "shapes":
        shapes = SMOKE_SHAPES if smoke else "shapes"
        return shapes, shapes, ["engine.seed=1"]  # procedural: seed 1 draws other training and val images
    if name == "fashion-mnist":
        return str(fashion), str(holdout_idx(fashion, build / "fashion-screen")), []
    if name == "cifar10":
        return str(cifar), str(holdout_tar(cifar, build / "cifar10-screen.tar")), []
    if name == "cifar10-2class":
        data = pair_subset(cifar, build / f"cifar10-{'-'.join(PAIR)}-{2 * PAIR_PER_CLASS}.tar")
        return str(data), str(holdout_tar(data, build / f"{data.stem}-screen.tar")), []
    if name == "fashion-lt":
        data = longtail_idx(fashion, build / f"fashion-lt{LT_RATIO:g}-{LT_TOTAL}")
        return str(data), str(holdout_idx(data, build / f"{data.name}-screen")), []
    raise SystemExit(f"unknown row {name!r}: choose from {', '.join(ROWS)}")


# ---- scores, the search, rows ---------------------------------------------------------------------


def score_se(summary: dict, metric: str) -> tuple[float | None, float | None]:
    """The run's score on its val split and its binomial standard error, from the per-class counts in
    ``summary.json``: top-1 (``acc``) or the mean of the per-class recalls (``balanced_acc``), with
    ``se^2 = sum_c p_c (1 - p_c) / n_c / C^2``. Without the counts, vitkit's own value and no error."""
    count, correct = summary.get("val_per_class_count"), summary.get("val_per_class_correct")
    if not count or sum(count) == 0:
        return summary.get("val_acc" if metric == "acc" else "val_balanced_acc"), None
    n, k = np.asarray(count, np.float64), np.asarray(correct, np.float64)
    if metric == "acc":
        p = k.sum() / n.sum()
        return float(p), float(math.sqrt(p * (1 - p) / n.sum()))
    present = n > 0
    p = k[present] / n[present]
    return float(p.mean()), float(math.sqrt((p * (1 - p) / n[present]).sum()) / present.sum())


def choose(search: list[dict]) -> str:
    """The configuration with the best screening ``score`` (None: the screen failed); a tie goes to the
    earlier one."""
    scored = [s for s in search if s.get("score") is not None]
    if not scored:
        raise SystemExit("no screened configuration has a score: " + "; ".join(s.get("error", "?") for s in search))
    return max(scored, key=lambda s: s["score"])["config"]  # max keeps the first of equals


def planned_budget_s(default: dict) -> float:
    """The no-flag run's budget: its plan's ``engine.time_budget``, else (a recipe, as on shapes) its wall time."""
    planned = (default["run_info"].get("plan") or {}).get("engine.time_budget") or {}
    return parse_duration(planned["value"]) if planned.get("value") else float(default["wall_s"])


def make_row(row: Row, default: dict, handset: dict, resnet: dict, budget_s: float, search: list[dict],
             screen_s: float) -> dict:
    """One results row from the stage records (:func:`stage`'s) of the three full-budget runs."""
    acc = {k: score_se(r["summary"], row.metric)[0] for k, r in
           (("default", default), ("handset", handset), ("resnet18", resnet))}
    runs = {"default": default, "handset": handset, "resnet18": resnet}
    return {
        "dataset": row.name, "acc_default": acc["default"], "acc_handset": acc["handset"],
        "acc_resnet18": acc["resnet18"],
        "ratio": acc["default"] / acc["handset"] if acc["default"] is not None and acc["handset"] else None,
        "wall_s": default["wall_s"], "budget_s": budget_s,
        "search": {"screen_budget_s": screen_s, "chosen": choose(search), "configs": search},
        "metric": row.metric, "about": row.about,
        "se": {k: score_se(r["summary"], row.metric)[1] for k, r in runs.items()},
        "model": {k: r["summary"].get("model") for k, r in runs.items()},
        "epochs": {k: r["summary"].get("epochs") for k, r in runs.items()},
        "wall": {k: r["wall_s"] for k, r in runs.items()},
        "commands": {k: r["command"] for k, r in runs.items()},
        "plateau_stop": default["summary"].get("plateau_stop"),
        "plan": default["run_info"].get("plan") or {},
    }


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``new`` rows replace old ones of the same dataset; old rows of an earlier format are dropped; ROWS order."""
    rows = {r["dataset"]: r for r in old if set(ROW_KEYS) <= set(r)}
    rows.update({r["dataset"]: r for r in new})
    order = list(ROWS)
    return sorted(rows.values(), key=lambda r: order.index(r["dataset"]) if r["dataset"] in order else len(order))


# ---- one row --------------------------------------------------------------------------------------


def run_row(row: Row, root: Path, reuse: bool, smoke: bool) -> dict:
    data, screen_data, screen_args = row_data(row.name, smoke=smoke)
    (root / row.name).mkdir(parents=True, exist_ok=True)
    default = stage(root, f"{row.name}/default", data, SMOKE_ARGS if smoke else [], reuse)
    budget_s = planned_budget_s(default)
    screen_s = min(SMOKE_SCREEN_S if smoke else SCREEN_S, budget_s)
    extra = SMOKE_RECIPE_ARGS if smoke else []

    def args(recipe_name: str, parts, seconds: float) -> list[str]:
        return ["--recipe", str(recipe_file(root, recipe_name, parts)), f"data.img_size={row.img_size}",
                f"engine.time_budget={max(1, round(seconds))}s", *extra]

    search = []
    for name, parts in SEARCH.items():
        entry = {"config": name, "budget_s": screen_s}
        try:
            res = stage(root, f"{row.name}/screen-{name}", screen_data, [*args(name, parts, screen_s), *screen_args],
                        reuse)
        except SystemExit as e:  # a failed configuration is recorded and left out of the choice
            entry.update(score=None, error=str(e)[-500:])
        else:
            score, se = score_se(res["summary"], row.metric)
            entry.update(score=score, se=se, epochs=res["summary"].get("epochs"), wall_s=res["wall_s"],
                         run_dir=res["run_dir"])
        search.append(entry)
        print(f"{row.name} screen {name}: {entry.get('score')}", flush=True)
    best = choose(search)
    handset = stage(root, f"{row.name}/handset", data, args(best, SEARCH[best], budget_s), reuse)
    resnet = stage(root, f"{row.name}/resnet18", data, args("resnet18", RESNET18, budget_s), reuse)
    out = make_row(row, default, handset, resnet, budget_s, search, screen_s)
    print(f"{row.name}: default {out['acc_default']:.4f}, hand-set ({best}) {out['acc_handset']:.4f}, "
          f"ResNet-18 {out['acc_resnet18']:.4f} ({row.metric}; budget {budget_s:.0f} s)", flush=True)
    return out


def run_facts(smoke: bool, root: Path, t0: float, load_start: tuple[float, ...]) -> dict:
    """What every results file records about the invocation: smoke or not, where the runs are, how long it
    took, the load around it, the machine and the versions."""
    return {"smoke": smoke, "run_root": str(root), "wall_s": time.time() - t0, "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(), "machine": machine(), "versions": versions(vitkit)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", choices=list(ROWS), default=None,
                    help="rows to run (default: all; --smoke: shapes)")
    ap.add_argument("--run-root", default=None,
                    help="where the runs go; finished stages there are reused (default: runs/defaults-<time>)")
    ap.add_argument("--smoke", action="store_true",
                    help="64 shapes images, 3 steps a run, second-scale budgets; results under /tmp")
    ap.add_argument("--out", default=None, help="results file (in benchmarks/results/ unless absolute)")
    args = ap.parse_args()
    rows = args.rows or (["shapes"] if args.smoke else list(ROWS))
    if args.smoke:
        root = Path(args.run_root or SMOKE_ROOT / "runs")
        shutil.rmtree(root, ignore_errors=True)
        out = args.out or str(SMOKE_ROOT / "defaults_smoke.json")
    else:
        root = Path(args.run_root or REPO / "runs" / f"defaults-{time.strftime('%Y%m%d-%H%M%S')}")
        out = args.out or "defaults.json"
    load_start, t0 = os.getloadavg(), time.time()
    new = [run_row(ROWS[name], root, reuse=not args.smoke, smoke=args.smoke) for name in rows]
    path = RESULTS / out
    old = json.loads(path.read_text()).get("rows", []) if path.is_file() else []
    payload = {
        "benchmark": "`vitkit train --data PATH` with no other arguments vs the best of a screened hand-set "
                     "search and ResNet-18, same wall-clock budget",
        "rows": merge_rows(old, new),
        "units": {"acc_*": "top-1, or balanced accuracy where metric is balanced_acc, on the row's test split",
                  "ratio": "acc_default / acc_handset", "wall_s": "the no-flag process",
                  "budget_s": "the no-flag plan's engine.time_budget (shapes: its wall time), "
                              "given to the hand-set and ResNet-18 runs"},
        "search": {"configs": {name: recipe(parts) for name, parts in SEARCH.items()},
                   "screen_budget_s": SMOKE_SCREEN_S if args.smoke else SCREEN_S,
                   "screen_data": f"the row's training images, {SCREEN_HOLDOUT:.0%} of each class held out as val "
                                  "(shapes: engine.seed=1)",
                   "selection": "best screening score; ties to the earlier configuration; re-run at the full budget"},
        "resnet18_recipe": recipe(RESNET18),
        **run_facts(args.smoke, root, t0, load_start),
    }
    print("wrote", write_json(out, payload))


if __name__ == "__main__":
    main()
