"""Semantic segmentation of CamVid road scenes (SegNet's 11 classes, 240x180): every dense head on
one backbone under the same wall-clock budget, the no-flag ``vitkit train --data <camvid>``, and
the trivial location-prior baseline.

Each row trains with ``vitkit train`` (the CLI a user runs) on the 367 train images, with only the
head, the backbone and the time budget set, then scores the final weights on the 101 val images
at full resolution. The score is computed here, from the model's predictions, with a confusion
matrix in numpy (void = 11 left out), independently of vitkit's evaluator. Nothing is chosen on
val: the runs keep their final weights, and the two heads given the longer budget are named
before any run (``--long-heads``), not picked by their scores.

The baseline predicts at each pixel the class most frequent at that location in the train masks.

    python benchmarks/segment_camvid.py                      # 10 min per head, 15 for two, no-flag
    python benchmarks/segment_camvid.py --budget 60s --heads linear --no-flag-budget skip  # smoke

Writes ``benchmarks/results/segment_camvid.json`` and ``segment_camvid.png`` (mIoU per head).
"""

from __future__ import annotations

import argparse
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _common import RESULTS, cli_train, machine, versions, write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = next((p / "shared" / "datasets" for p in REPO.parents if (p / "shared" / "datasets").is_dir()),
              REPO.parent / "shared" / "datasets")
ARCHIVE = SHARED / "camvid-240.tar.gz"
CACHE = Path(os.environ.get("VITKIT_BENCH_CACHE", Path.home() / ".cache" / "vitkit-bench"))
VOID = 11
NUM_CLASSES = 11
HEADS = ("linear", "setr_pup", "setr_mla", "segmenter", "dpt", "upernet", "vit_adapter")
BACKBONE = "vit_nano_convstem_patch8_64"


def camvid_root(path: str | None) -> Path:
    """The extracted ``camvid/`` folder (extracted once into the cache from the shared archive)."""
    if path:
        return Path(path)
    root = CACHE / "camvid-240" / "camvid"
    if not (root / "trainannot").is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(root.parent, filter="data")
    return root


def pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    out = []
    for img in sorted((root / split).glob("*.jpg")):
        out.append((img, root / f"{split}annot" / f"{img.stem}.png"))
    return out


def confusion(pred: np.ndarray, mask: np.ndarray) -> np.ndarray:
    keep = mask != VOID
    idx = mask[keep].astype(np.int64) * NUM_CLASSES + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


def scores(conf: np.ndarray) -> dict:
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return {"miou": float(np.nanmean(iou)), "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
            "pixel_acc": float(tp.sum() / max(conf.sum(), 1))}


def location_prior(root: Path) -> dict:
    """mIoU on val of predicting, at each pixel, the class most frequent there in the train masks."""
    counts = None
    for _, m in pairs(root, "train"):
        mask = np.asarray(Image.open(m))
        if counts is None:
            counts = np.zeros((NUM_CLASSES, *mask.shape), np.int64)
        for c in range(NUM_CLASSES):
            counts[c] += mask == c
    prior = counts.argmax(0)
    conf = sum(confusion(prior, np.asarray(Image.open(m))) for _, m in pairs(root, "val"))
    return scores(conf)


@torch.no_grad()
def evaluate_run(run: Path, root: Path) -> dict:
    """Full-resolution val scores of the run's final weights, from its predictions."""
    from vitkit.source import load_model

    loaded = load_model(str(run))
    loaded.model.eval()
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    t0 = time.perf_counter()
    n = 0
    for img_path, mask_path in pairs(root, "val"):
        img = torch.from_numpy(np.asarray(Image.open(img_path).convert("RGB")).copy()).permute(2, 0, 1)
        pred = loaded.dense(img[None]).argmax(1)[0].cpu().numpy()
        conf += confusion(pred, np.asarray(Image.open(mask_path)))
        n += 1
    params = sum(p.numel() for p in loaded.model.parameters())
    return {**scores(conf), "eval_img_s": n / (time.perf_counter() - t0), "params": params}


def row(head: str, backbone: str, budget: str, root: Path, run_root: Path, extra: list[str]) -> dict:
    from vitkit.engine.budget import parse_duration

    out = run_root / f"{head}-{budget}"
    tr = cli_train(str(root), out, [f"engine.time_budget={budget}", f"model.name={backbone}", f"model.head={head}",
                                    *extra])
    ev = evaluate_run(out, root)
    s = tr["summary"]
    return {
        "head": head, "backbone": backbone, "init": "random (from scratch)", "miou": ev["miou"],
        "per_class_iou": ev["per_class_iou"], "pixel_acc": ev["pixel_acc"], "params": ev["params"],
        "train_img_s": s.get("train_img_per_s"), "eval_img_s": ev["eval_img_s"], "wall_s": tr["wall_s"],
        "budget_s": parse_duration(budget), "steps": s.get("steps"), "epochs": s.get("epochs"),
        "crop": tr["run_info"].get("img_size"), "run_dir": str(out),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['head']}\n{int(r['budget_s'] // 60)} min" for r in rows]
    vals = [100 * r["miou"] for r in rows]
    if result.get("no_flag"):
        labels.append(f"no-flag\n{int(result['no_flag']['budget_s'] // 60)} min")
        vals.append(100 * result["no_flag"]["miou"])
    fig, ax = plt.subplots(figsize=(1.1 * len(vals) + 2, 4))
    ax.bar(range(len(vals)), vals, color="#4c72b0")
    ax.axhline(100 * result["baseline_location_prior"], color="#c44e52", ls="--", label="location prior")
    ax.set_xticks(range(len(vals)), labels, fontsize=8)
    ax.set_ylabel("val mIoU (%)")
    ax.set_title(f"CamVid 240x180, 11 classes, from scratch on {os.cpu_count()} CPU cores")
    for i, v in enumerate(vals):
        ax.text(i, v + 0.5, f"{v:.1f}", ha="center", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from vitkit.engine.budget import parse_duration

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="an extracted camvid/ folder (default: the shared archive)")
    ap.add_argument("--heads", default=",".join(HEADS))
    ap.add_argument("--backbone", default=BACKBONE)
    ap.add_argument("--budget", default="10m", help="wall-clock budget per head")
    ap.add_argument("--long-heads", default="upernet,setr_pup", help="heads that also run with --long-budget")
    ap.add_argument("--long-budget", default="15m")
    ap.add_argument("--no-flag-budget", default="plan", help="'plan' (the plan's own), a duration, or 'skip'")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every head row")
    ap.add_argument("--run-root", default=None)
    ap.add_argument("--out", default="segment_camvid.json")
    args = ap.parse_args()
    root = camvid_root(args.data)
    run_root = Path(args.run_root or REPO / "runs" / f"segment-camvid-{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.time()
    result: dict = {
        "benchmark": "segment_camvid", "data": str(root), "classes": (root / "classes.txt").read_text().split(),
        "budget": args.budget, "long_budget": args.long_budget, "machine": machine(), "versions": versions(),
        "baseline_location_prior": None, "rows": [], "no_flag": None, "complete": False,
    }
    base = location_prior(root)
    result["baseline_location_prior"] = base["miou"]
    result["baseline_detail"] = base
    print(f"location prior: val mIoU {base['miou']:.4f}", flush=True)
    if args.no_flag_budget != "skip":
        extra = [] if args.no_flag_budget == "plan" else [f"engine.time_budget={args.no_flag_budget}"]
        out = run_root / "no-flag"
        t = time.time()
        tr = cli_train(str(root), out, extra)
        ev = evaluate_run(out, root)
        run_info = tr["run_info"]
        planned = ((run_info.get("plan") or {}).get("engine.time_budget") or {}).get("value")
        budget_s = parse_duration(args.no_flag_budget if extra else planned) if (extra or planned) else None
        result["no_flag"] = {"miou": ev["miou"], "per_class_iou": ev["per_class_iou"], "pixel_acc": ev["pixel_acc"],
                             "params": ev["params"], "train_img_s": tr["summary"].get("train_img_per_s"),
                             "wall_s": time.time() - t, "budget_s": budget_s, "plan": run_info.get("plan"),
                             "run_dir": str(out)}
        print(f"no-flag: val mIoU {ev['miou']:.4f}", flush=True)
        write_json(args.out, {**result, "wall_s": time.time() - t0})
    plan = [(h, args.budget) for h in args.heads.split(",") if h]
    plan += [(h, args.long_budget) for h in args.long_heads.split(",") if h]
    for head, budget in plan:
        r = row(head, args.backbone, budget, root, run_root, args.set)
        result["rows"].append(r)
        print(f"{head} ({budget}): val mIoU {r['miou']:.4f}, pixel acc {r['pixel_acc']:.4f}, "
              f"{r['train_img_s']} img/s, {r['epochs']} epochs", flush=True)
        write_json(args.out, {**result, "wall_s": time.time() - t0})
    result.update({"wall_s": time.time() - t0, "complete": True})
    path = write_json(args.out, result)
    plot(result, RESULTS / Path(args.out).with_suffix(".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
