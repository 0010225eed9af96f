"""Parameter-efficient transfer, in the style of VTAB-1k: one source backbone pretrained with vitkit,
adapted to 1,000-image training sets of three target sets by every PEFT method under the same
wall-clock budget, scored on each target's test split.

Source: a vitkit run's ``model.safetensors`` (``--source``, default the CIFAR-10 backbone the
raccoon detection benchmark pretrained: ``vit_nano_convstem_patch8_64`` at 32 px, supervised with
the ``cifar10_fast`` recipe for 30 min; its ``config.yaml`` beside it gives the architecture). Every
row starts from its backbone with a fresh head (the source's CIFAR-10 classifier is dropped into a
cached head-less copy), as VTAB does.

Targets (materialised once as class-folder trees under ``~/.cache/vitkit-bench/peft/``:
``train/<class>/`` for training, ``test/<class>/`` read by vitkit as the run's val split):

- ``fashion``: Fashion-MNIST (shared IDX files), 100 training images per class drawn with the seed
  from the 60,000, scored on the whole 10,000-image test set;
- ``shapes``: vitkit's procedural shapes at 32 px, 1,000 training images and a 6,000-image test set
  drawn with another seed and the other random stream;
- ``camvid``: CamVid road scenes cut into 32x32 crops labelled by the class covering at least 60%
  of the crop (void counts against it): a texture and scene transfer far from CIFAR's objects.
  Training crops come from the 367 training photos (as even over the classes as their counts
  allow), test crops from the 101 val photos only; classes with fewer than 10 training crops are
  left out (``target.json`` in the folder lists the classes and counts).

Methods: ``full`` (``peft.method=none``), ``linear``, ``bitfit``, ``lora``, ``vpt_shallow``,
``vpt_deep``, ``adaptformer``, ``partial`` (k=1), each with vitkit's defaults for its keys. Each row is
one fresh ``vitkit train --init BACKBONE --data TARGET peft.method=M engine.time_budget=BUDGET``
process, as a user runs it: the plan sets the rest (batch, lr, schedule, augmentation; recorded in
the row), except two keys: ``engine.epochs`` and ``engine.eval_every`` are set past any run, so the
budget alone ends every row (a method with faster steps is not stopped early by the plan's epoch
cap) and the test split is evaluated once, at the end (vitkit reserves that evaluation's time inside
the budget). Per row:

- ``acc``: top-1 of the run's final weights on the target's test split (:func:`vitkit.evaluate.evaluate`,
  no test-time augmentation; nothing is chosen on the test split);
- ``trainable_params``: the method's own parameters, the head excluded (``head_params`` apart);
  ``trainable_pct`` = 100 x that / the backbone's parameters (full fine-tuning: 100);
- ``peak_mem_mb``: the training process's peak resident memory (``ru_maxrss`` from ``wait4`` on that
  one child, so every row is its own fresh process); ``idle_rss_mb`` in ``meta`` is a process that
  only imports vitkit and loads the source, for scale;
- ``step_ms``: the median time per optimizer step from the run's ``metrics.jsonl`` (global batch /
  logged img/s, the first logging window skipped), ``step_ms_mean`` the run's training time over
  its steps; ``wall_s``: the whole process.

    python benchmarks/peft_transfer.py                                    # everything, 4 min per row
    python benchmarks/peft_transfer.py --targets fashion --methods full,lora   # part of it
    python benchmarks/peft_transfer.py --smoke                            # < 1 min, results to /tmp

Rows are merged into ``benchmarks/results/peft.json`` (a rerun replaces its (target, method) rows),
so the run can be split over quiet sessions; ``summary`` is recomputed from all rows, and the plot
(``results/peft.png``: accuracy vs trainable parameters) redrawn.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from segment_camvid import CACHE, SHARED, VOID, camvid_root, pairs

from _common import RESULTS, machine, versions

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "runs" / "detect-raccoon-20261206-132406" / "pretrain-cifar10" / "model.safetensors"
FASHION = SHARED / "fashion-mnist"
TARGETS = ("fashion", "shapes", "camvid")
METHODS = ("full", "linear", "bitfit", "lora", "vpt_shallow", "vpt_deep", "adaptformer", "partial")
METHOD_ARGS = {"full": ["peft.method=none"], "partial": ["peft.method=partial", "peft.partial_k=1"]}
FASHION_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")  # the IDX label order; folder-safe names
TEST_SIZE = {"fashion": 10000, "shapes": 6000, "camvid": 3000}
CROP, CROP_MIN_FRACTION, CROPS_PER_PHOTO, MIN_CLASS_CROPS = 32, 0.6, 24, 10
NO_CAP = 1_000_000  # epochs: the time budget alone ends every row, evaluated at its end only
PEFT_GOAL_PCT = 2.0  # the budget of trainable parameters, head excluded


# ---- target sets ---------------------------------------------------------------------------------


def balanced_pick(by_class: dict[str, list], n: int, rng: np.random.Generator) -> dict[str, list]:
    """Up to ``n`` items drawn (seeded) as evenly over the classes as their counts allow: a class with
    fewer items than its share gives all of them and the others share the rest."""
    pools = {c: [items[i] for i in rng.permutation(len(items))] for c, items in sorted(by_class.items())}
    take = dict.fromkeys(pools, 0)
    left = n
    while left > 0:
        open_ = [c for c in pools if take[c] < len(pools[c])]
        if not open_:
            break
        share = max(1, left // len(open_))
        for c in open_:
            k = min(share, len(pools[c]) - take[c], left)
            take[c] += k
            left -= k
            if not left:
                break
    return {c: pools[c][: take[c]] for c in pools if take[c]}


def write_split(root: Path, split: str, items: dict[str, list], image) -> dict[str, int]:
    """``root/split/<class>/NNNNN.png`` for each item; ``image(item)`` gives its PIL image. Returns counts."""
    k = 0
    for cls, members in items.items():
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        for item in members:
            image(item).save(folder / f"{k:05d}.png")
            k += 1
    return {c: len(m) for c, m in items.items()}


def fashion_items(files: Path, n_train: int, n_test: int, seed: int):
    from vitkit.data.arrays import read_idx

    def arrays(prefix: str):
        images = read_idx(str(files / f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(str(files / f"{prefix}-labels-idx1-ubyte.gz"))
        by_class = {FASHION_CLASSES[c]: [images[i] for i in np.flatnonzero(labels == c)] for c in range(10)}
        return by_class, len(images)

    train, _ = arrays("train")
    test, n_all = arrays("t10k")
    test_pick = test if n_test >= n_all else balanced_pick(test, n_test, np.random.default_rng([seed, 1]))
    return balanced_pick(train, n_train, np.random.default_rng([seed, 0])), test_pick, Image.fromarray, {
        "from": str(files), "train": f"{n_train} of Fashion-MNIST's 60,000 training images, even over the classes",
        "test": "the 10,000 test images" if test_pick is test else f"{n_test} of the 10,000 test images"}


def shapes_items(n_train: int, n_test: int, seed: int):
    from vitkit.data.shapes import ShapesDataset

    def items(ds):
        out: dict[str, list] = {}
        for i in range(len(ds)):
            out.setdefault(ds.classes[ds.targets[i]], []).append(i)
        return {c: [(ds, i) for i in v] for c, v in out.items()}

    train = ShapesDataset(n_train, "train", img_size=32, seed=seed)
    test = ShapesDataset(n_test, "val", img_size=32, seed=seed + 1)
    return items(train), items(test), lambda it: it[0].sample(it[1])["image"], {
        "train": f"vitkit shapes, {n_train} images at 32 px, seed {seed}, train stream",
        "test": f"{n_test} images at 32 px, seed {seed + 1}, val stream (no pixel shared with training)"}


def camvid_crops(photos: list[tuple[Path, Path]], per_photo: int, rng: np.random.Generator,
                 classes: list[str]) -> dict[str, list]:
    """32x32 crops at random places in each photo, kept when one class covers at least 60% of the crop
    (void pixels count against it); ``{class: [(photo, x, y)]}``."""
    out: dict[str, list] = {}
    for img, mask_file in photos:
        mask = np.asarray(Image.open(mask_file))
        h, w = mask.shape
        for _ in range(per_photo):
            y, x = int(rng.integers(0, h - CROP + 1)), int(rng.integers(0, w - CROP + 1))
            counts = np.bincount(mask[y:y + CROP, x:x + CROP].ravel(), minlength=VOID + 1)[:VOID]
            c = int(counts.argmax())
            if counts[c] >= CROP_MIN_FRACTION * CROP * CROP:
                out.setdefault(classes[c], []).append((img, x, y))
    return out


def camvid_items(root: Path, n_train: int, n_test: int, seed: int):
    from vitkit.data.images import read_image

    classes = (root / "classes.txt").read_text().split()
    train = camvid_crops(pairs(root, "train"), CROPS_PER_PHOTO, np.random.default_rng([seed, 0]), classes)
    test = camvid_crops(pairs(root, "val"), 2 * CROPS_PER_PHOTO, np.random.default_rng([seed, 1]), classes)
    kept = [c for c in classes if len(train.get(c, [])) >= MIN_CLASS_CROPS]
    train = balanced_pick({c: train[c] for c in kept}, n_train, np.random.default_rng([seed, 2]))
    test = balanced_pick({c: v for c, v in test.items() if c in kept}, n_test, np.random.default_rng([seed, 3]))

    def crop(item):
        img, x, y = item
        return read_image(img, 3).crop((x, y, x + CROP, y + CROP))

    return train, test, crop, {
        "from": str(root), "train": f"{CROP}x{CROP} crops of the 367 training photos labelled by a class covering "
        f">= {CROP_MIN_FRACTION:.0%} of the crop, as even over the classes as their counts allow",
        "test": "crops of the 101 val photos (other photos than training)",
        "classes_left_out": [c for c in classes if c not in kept]}


def materialise(target: str, n_train: int, seed: int, n_test: int | None = None, cache: Path | None = None,
                fashion: Path = FASHION, camvid: Path | None = None) -> Path:
    """The target's folder (built once): ``train/<class>/*.png``, ``test/<class>/*.png`` and ``target.json``."""
    n_test = n_test or TEST_SIZE[target]
    dest = (cache or CACHE / "peft") / f"{target}-{n_train}-{n_test}-s{seed}"
    if (dest / "target.json").is_file():
        return dest
    if target == "fashion":
        train, test, image, about = fashion_items(Path(fashion), n_train, n_test, seed)
    elif target == "shapes":
        train, test, image, about = shapes_items(n_train, n_test, seed)
    elif target == "camvid":
        train, test, image, about = camvid_items(camvid or camvid_root(None), n_train, n_test, seed)
    else:
        raise SystemExit(f"unknown target {target!r}: choose from {', '.join(TARGETS)}")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {"train": write_split(tmp, "train", train, image), "test": write_split(tmp, "test", test, image)}
    about.update(target=target, seed=seed, n_train=sum(counts["train"].values()),
                 n_test=sum(counts["test"].values()), counts=counts)
    (tmp / "target.json").write_text(json.dumps(about, indent=2) + "\n")
    tmp.rename(dest)
    return dest


# ---- the source backbone ----------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_source(path: Path) -> dict:
    """The source run's architecture (the ``vitkit train`` overrides that rebuild it) and how it was trained."""
    from vitkit.rundir import RunDir

    run = RunDir.of_checkpoint(path)
    cfg = run.read_config() if run is not None else {}
    if not path.is_file() or not cfg:
        raise SystemExit(f"--source {path}: expected a vitkit run's model.safetensors with the run's config.yaml "
                         "beside it (it names the architecture)")
    summary = json.loads(run.summary_json.read_text()) if run.summary_json.is_file() else {}
    model, data = cfg["model"], cfg["data"]
    args = [f"model.name={model['name']}", f"data.img_size={data['img_size']}", f"data.in_chans={data['in_chans']}"]
    args += [f"model.args.{k}={v}" for k, v in (model.get("args") or {}).items()]
    return {
        "weights": str(path), "sha256": file_sha256(path), "model": model["name"], "model_args": model.get("args"),
        "img_size": data["img_size"], "pretraining": {
            "objective": cfg["objective"]["name"], "data": data["path"], "time_budget": cfg["engine"]["time_budget"],
            "steps": summary.get("steps"), "epochs": summary.get("epochs"), "wall_s": summary.get("wall_s"),
            "val_acc": summary.get("val_acc")},
        "train_args": args,
    }


def headless_copy(source: dict, cache: Path) -> Path:
    """The source's weights without its classifier (cached by the source's sha256): every target gets a
    fresh head."""
    from vitkit.source import load_model
    from vitkit.weights_io import save_weights

    out = cache / f"source-{source['sha256'][:12]}-headless.safetensors"
    if not out.is_file():
        lm = load_model(source["weights"])
        lm.model.reset_classifier(0)
        save_weights(lm.model, out)
    return out


# ---- one row ------------------------------------------------------------------------------------------


# Linux starts a child's ru_maxrss at the resident size of the process it was forked from (the high-water
# mark before exec is kept), so the benchmark, torch loaded, would lend every row its own size. A small
# launcher starts each training process instead and reports that process's ru_maxrss (wait4: that one
# child and the children it reaped, e.g. loader workers), not the maximum over every child so far.
_LAUNCH = ("import os, sys\n"
           "pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)\n"
           "_, status, usage = os.wait4(pid, 0)\n"
           "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
           "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run_child(cmd: list[str], log: Path) -> tuple[int, float, float | None]:
    """Run ``cmd`` in a fresh process with its output to ``log``; (exit code, wall seconds, the process's
    peak resident MiB)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        maxrss = Path(tmp) / "maxrss"
        t0 = time.time()
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, "-c", _LAUNCH, str(maxrss), *cmd], stdout=f,
                                stderr=subprocess.STDOUT).returncode
        wall = time.time() - t0
        kib = int(maxrss.read_text()) if maxrss.is_file() else None  # Linux reports kilobytes
    return rc, wall, kib / 1024 if kib is not None else None


def step_ms(metrics: Path, global_batch: int) -> float | None:
    """Median ms per optimizer step over the run's logged training windows, the first (warm-up) skipped."""
    if not metrics.is_file() or not global_batch:
        return None
    rates = [r["img_per_s"] for r in map(json.loads, metrics.read_text().splitlines())
             if r.get("kind") == "train" and r.get("img_per_s")]
    rates = rates[1:] or rates
    return 1000 * global_batch / statistics.median(rates) if rates else None


def trainable_counts(model, run_info: dict) -> dict:
    """The method's own trainable parameters (head excluded), the head's, and the backbone's: as the run
    recorded them (``run.json``'s ``peft``), else as the loaded model carries them; full fine-tuning counts
    every parameter."""
    info = getattr(model, "peft_info", None)
    reported = run_info.get("peft")
    if reported:
        counts = {"trainable_params": reported["n_method"], "head_params": reported["n_head"],
                  "base_params": reported["n_base"]}
    elif info is not None:
        counts = {"trainable_params": info.n_method, "head_params": info.n_head, "base_params": info.n_base}
    else:
        heads = tuple(model.classifier_names())
        named = list(model.named_parameters())
        head = sum(p.numel() for n, p in named if any(n == h or n.startswith(h + ".") for h in heads))
        total = sum(p.numel() for _, p in named)
        counts = {"trainable_params": total - head, "head_params": head, "base_params": total - head}
    counts["trainable_pct"] = 100 * counts["trainable_params"] / counts["base_params"]
    return counts


def run_row(target: str, data: Path, method: str, init: Path, source: dict, budget: str, run_root: Path,
            extra: list[str]) -> dict:
    from vitkit.engine.budget import parse_duration
    from vitkit.evaluate import evaluate
    from vitkit.rundir import RunDir
    from vitkit.source import load_model

    out = run_root / f"{target}-{method}"
    cmd = [sys.executable, "-m", "vitkit.cli.main", "train", "--init", str(init), "--data", str(data), "--out",
           str(out), "--force", *source["train_args"], *METHOD_ARGS.get(method, [f"peft.method={method}"]),
           f"engine.time_budget={budget}", f"engine.epochs={NO_CAP}", f"engine.eval_every={NO_CAP}", "engine.tensorboard=false",
           "engine.plots=false", *extra]
    base = {"target": target, "method": method, "budget_s": parse_duration(budget),
            "loadavg_1m_before": os.getloadavg()[0], "command": " ".join(["vitkit", *cmd[3:]])}
    rc, wall, rss = run_child(cmd, run_root / f"{target}-{method}.log")
    if rc != 0:
        tail = (run_root / f"{target}-{method}.log").read_text()[-1500:]
        print(f"{target} {method}: FAILED (exit {rc})\n{tail}", flush=True)
        return {**base, "error": tail, "wall_s": wall}
    run = RunDir(out)
    summary, run_info = json.loads(run.summary_json.read_text()), json.loads(run.run_json.read_text())
    lm = load_model(str(out))
    ev = evaluate(lm, str(data), split="val", out_dir=out)
    adapter = out / "adapter.safetensors"
    row = {
        **base, "acc": ev["top1"], "balanced_acc": ev["balanced_acc"], "n_test": ev["n"],
        **trainable_counts(lm.model, run_info), "peak_mem_mb": rss,
        "step_ms": step_ms(run.metrics, summary.get("global_batch")),
        "step_ms_mean": 1000 * summary["train_time_s"] / summary["steps"] if summary.get("steps") else None,
        "wall_s": wall, "steps": summary.get("steps"), "epochs": summary.get("epochs"),
        "stopped": summary.get("stopped"),
        "adapter_bytes": adapter.stat().st_size if adapter.is_file() else None,
        "plan": {k: v["value"] for k, v in (run_info.get("plan") or {}).items()}, "run_dir": str(out),
    }
    print(f"{target} {method}: acc {row['acc']:.2%}, {row['trainable_params']:,} trainable "
          f"({row['trainable_pct']:.2f}%) + head {row['head_params']:,}, {row['peak_mem_mb']:.0f} MiB, "
          f"{row['step_ms'] or float('nan'):.1f} ms/step, {row['steps']} steps, {wall:.0f} s", flush=True)
    return row


# ---- results ----------------------------------------------------------------------------------------------


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with each (target, method) of ``new`` replaced or added, in target then method order."""
    rows = {(r["target"], r["method"]): r for r in old}
    rows.update({(r["target"], r["method"]): r for r in new})
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows.values(), key=lambda r: (r["target"], order.get(r["method"], len(order))))


def summarise(rows: list[dict]) -> dict:
    """Means over the targets for each method measured on all of them, and the issue's goal: the best
    method at <= 2% trainable parameters (head excluded) within 1 point of full fine-tuning, with
    lower step time and peak memory."""
    ok = [r for r in rows if "acc" in r]
    targets = sorted({r["target"] for r in ok})
    by = {(r["target"], r["method"]): r for r in ok}
    methods = [m for m in METHODS if targets and all((t, m) in by for t in targets)]

    def mean(m, key):
        vals = [by[t, m][key] for t in targets]
        return statistics.fmean(vals) if None not in vals else None

    means = {m: {"acc": mean(m, "acc"), "trainable_pct_max": max(by[t, m]["trainable_pct"] for t in targets),
                 "step_ms": mean(m, "step_ms"), "peak_mem_mb": mean(m, "peak_mem_mb")} for m in methods}
    out = {"targets": targets, "mean_over_targets": means,
           "budgets_s": sorted({r["budget_s"] for r in ok})}
    cands = [m for m in methods if m != "full" and means[m]["trainable_pct_max"] <= PEFT_GOAL_PCT]
    if "full" in means and cands:
        best = max(cands, key=lambda m: means[m]["acc"])
        full, b = means["full"], means[best]
        gap = 100 * (full["acc"] - b["acc"])
        faster = None if None in (b["step_ms"], full["step_ms"]) else b["step_ms"] < full["step_ms"]
        lighter = b["peak_mem_mb"] < full["peak_mem_mb"]
        out["goal"] = {
            "best_peft": best, "best_peft_acc": b["acc"], "full_acc": full["acc"], "gap_points": gap,
            "within_1_point": gap <= 1.0, "within_2_points": gap <= 2.0, "faster_than_full": faster,
            "less_memory_than_full": lighter, "met": gap <= 1.0 and bool(faster) and lighter,
            "rule": f"best mean acc among methods with <= {PEFT_GOAL_PCT:g}% trainable (head excluded) on every "
                    "target vs full fine-tuning, same budget, same invocation set",
        }
    return out


def plot(result: dict, path: Path) -> None:
    """Accuracy vs trainable parameters (the method's plus the head's, log scale): one panel per target and
    one for the mean over the targets; full fine-tuning dashed."""
    from matplotlib.figure import Figure

    rows = [r for r in result["rows"] if "acc" in r]
    targets = sorted({r["target"] for r in rows})
    if not rows:
        return
    colour = {m: f"C{i}" for i, m in enumerate(METHODS)}
    panels = [(t, [r for r in rows if r["target"] == t]) for t in targets]
    means = result["summary"]["mean_over_targets"]
    if len(targets) > 1 and means:
        panels.append(("mean over targets", [
            {"method": m, "acc": v["acc"], **{k: statistics.fmean(r[k] for r in rows if r["method"] == m)
                                              for k in ("trainable_params", "head_params")}}
            for m, v in means.items()]))
    fig = Figure(figsize=(max(7.0, 4.6 * len(panels)), 4.6))
    for ax, (title, pts) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for r in pts:
            x = r["trainable_params"] + r["head_params"]
            ax.scatter(x, 100 * r["acc"], color=colour.get(r["method"], "k"), s=36, zorder=3)
            ax.annotate(r["method"], (x, 100 * r["acc"]), textcoords="offset points", xytext=(4, 3), fontsize=8)
            if r["method"] == "full":
                ax.axhline(100 * r["acc"], color="grey", ls="--", lw=1)
        edge = PEFT_GOAL_PCT / 100 * rows[0]["base_params"] + statistics.fmean(r["head_params"] for r in pts)
        ax.axvline(edge, color="grey", ls=":", lw=1)  # the goal's 2% of the backbone, plus the head
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel("trainable parameters incl. head (log)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
    g = result["summary"].get("goal")
    sub = (f"best PEFT at <= {PEFT_GOAL_PCT:g}% trainable: {g['best_peft']} {100 * g['best_peft_acc']:.1f}% vs full "
           f"fine-tuning {100 * g['full_acc']:.1f}% ({-g['gap_points']:+.1f} pt, mean over targets)\n" if g else "")
    budgets = ", ".join(f"{b / 60:g} min" if b >= 60 else f"{b:g} s" for b in result["summary"]["budgets_s"])
    fig.suptitle(f"{sub}source {result['source']['model']} pretrained on "
                 f"{Path(result['source']['pretraining']['data']).name}; {budgets} per row; dashed: full fine-tuning; "
                 f"dotted: {PEFT_GOAL_PCT:g}% of the backbone + head",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def idle_rss_mb(source: Path) -> float:
    """Peak resident memory of a fresh process that imports vitkit's training code and loads the source."""
    code = f"import vitkit.train; from vitkit.source import load_model; load_model({str(source)!r})"
    return run_child([sys.executable, "-c", code], Path(os.devnull))[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(SOURCE), help="a vitkit run's model.safetensors (config.yaml beside it)")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--budget", default="4m", help="wall-clock training budget per row (engine.time_budget)")
    ap.add_argument("--n-train", type=int, default=1000, help="training images per target")
    ap.add_argument("--n-test", type=int, default=None, help="test images per target (default: fashion 10,000, "
                                                             "shapes 6,000, camvid up to 3,000 crops)")
    ap.add_argument("--seed", type=int, default=0, help="draws the training subsets and the shapes")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every row")
    ap.add_argument("--run-root", default=None, help="where the runs go (default: runs/peft-transfer-<time>)")
    ap.add_argument("--out", default=str(RESULTS / "peft.json"), help="the JSON rows are merged into")
    ap.add_argument("--fresh", action="store_true", help="start the JSON over instead of merging into it")
    ap.add_argument("--smoke", action="store_true",
                    help="a < 1 min check of the pipeline: shapes, full and lora, 64 images, 3 s each, results "
                         "to /tmp/peft-smoke")
    args = ap.parse_args()
    if args.smoke:
        args.targets, args.methods, args.budget, args.n_train, args.n_test = "shapes", "full,lora", "3s", 64, 60
        args.out, args.run_root, args.fresh = "/tmp/peft-smoke/peft.json", "/tmp/peft-smoke/runs", True
    targets, methods = args.targets.split(","), args.methods.split(",")
    unknown = [t for t in targets if t not in TARGETS] + [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown target or method {unknown}: targets {', '.join(TARGETS)}; methods "
                         f"{', '.join(METHODS)}")
    import vitkit

    out = Path(args.out)
    source = describe_source(Path(args.source).expanduser().resolve())
    result = json.loads(out.read_text()) if out.is_file() and not args.fresh else {"rows": []}
    if result.get("source") and result["source"]["sha256"] != source["sha256"]:
        raise SystemExit(f"{out} holds rows adapted from another source ({result['source']['weights']}): pass "
                         "--fresh to start it over, or --out another file")
    cache = CACHE / "peft"
    cache.mkdir(parents=True, exist_ok=True)
    init = headless_copy(source, cache)
    run_root = Path(args.run_root or REPO / "runs" / f"peft-transfer-{time.strftime('%Y%m%d-%H%M%S')}")
    meta = result.setdefault("meta", {})
    meta.update(machine=machine(), versions=versions(vitkit), budget=args.budget, n_train=args.n_train,
                seed=args.seed, idle_rss_mb=idle_rss_mb(init), init=str(init),
                protocol="fresh vitkit train process per row from the source backbone with a new head; the plan "
                         "sets everything but the method and the budget; final weights scored on the test split")
    meta.setdefault("targets", {})
    for target in targets:
        data = materialise(target, args.n_train, args.seed, args.n_test, cache)
        meta["targets"][target] = {"path": str(data), **json.loads((data / "target.json").read_text())}
        for method in methods:
            row = run_row(target, data, method, init, source, args.budget, run_root, args.set)
            failed = [r for r in result.get("failed", []) if (r["target"], r["method"]) != (target, method)]
            result["failed"] = failed + [row] if "error" in row else failed  # a failure keeps an older good row
            result.update(source=source, rows=result["rows"] if "error" in row else merge_rows(result["rows"], [row]))
            result["summary"] = summarise(result["rows"])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
