"""Object detection on the raccoon photos (200 images, one class, 160 train / 40 val): every detector
under the same wall-clock budget, the no-flag ``vitkit train --data <raccoon>``, and the constant-box
baseline.

Rows train with ``vitkit train`` (the CLI a user runs) with only the detector, the backbone, its
initial weights and the time budget set; the plan fills in the rest (image size, batch, lr,
augmentation). The detectors' backbones start from vitkit's own supervised pretraining on the
shared CIFAR-10 (``--pretrain``: the committed ``cifar10_fast`` recipe, the run recorded in the
JSON); the no-flag run takes whatever its plan takes. Each run's final weights are scored on the
val split here, independently of vitkit's evaluator and data readers: boxes predicted on each val
photo, scaled back to its pixels and scored by pycocotools against ``instances_val.json`` as read
from disk. Nothing is chosen on val.

The baseline predicts one box per image, the mean training box relative to the image size.

    python benchmarks/detect_raccoon.py --pretrain 30m                    # the backbone, once
    python benchmarks/detect_raccoon.py --init runs/<pretrain>/model.safetensors --models vitdet_fcos,detr
    python benchmarks/detect_raccoon.py --models none --no-flag plan      # the no-flag row only
    python benchmarks/detect_raccoon.py --data scenes --synthetic detr:15m  # DETR's matching on the scenes

Rows are merged into ``benchmarks/results/detect_raccoon.json`` (one row per model; a rerun
replaces that model's row), so the rows can be measured in separate quiet sessions.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
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
ARCHIVE = SHARED / "raccoon-416.tar.gz"
CIFAR = SHARED / "cifar10-jpg.tar.gz"
CACHE = Path(os.environ.get("VITKIT_BENCH_CACHE", Path.home() / ".cache" / "vitkit-bench"))
MODELS = ("vitdet_fcos", "detr", "deformable_detr", "yolos")
# The backbone every detector row starts from: the cifar10_fast recipe's model (a conv-stem nano ViT,
# patch 8, 192 wide), pretrained supervised on CIFAR-10 by --pretrain.
BACKBONE = ["model.name=vit_nano_convstem_patch8_64", "model.args.stem_width=192"]
OUT = "detect_raccoon.json"


def raccoon_root(path: str | None) -> Path:
    """The extracted ``raccoon/`` folder (extracted once into the cache from the shared archive)."""
    if path:
        return Path(path)
    root = CACHE / "raccoon" / "raccoon"
    if not (root / "annotations" / "instances_val.json").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(root.parent, filter="data")
    return root


def coco_scores(gt_file: Path, dets: list[dict]) -> dict:
    """pycocotools' bbox AP of ``dets`` (COCO result dicts) against the ground truth file."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        if not dets:
            return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    return {"ap": float(s[0]), "ap50": float(s[1]), "ap75": float(s[2]), "ap_small": float(s[3]),
            "ap_medium": float(s[4]), "ap_large": float(s[5]), "ar100": float(s[8])}


def constant_box(root: Path) -> dict:
    """AP of one box per val image: the mean train box, relative to each image's size."""
    train = json.loads((root / "annotations" / "instances_train.json").read_text())
    size = {i["id"]: (i["width"], i["height"]) for i in train["images"]}
    rel = np.array([[a["bbox"][0] / size[a["image_id"]][0], a["bbox"][1] / size[a["image_id"]][1],
                     a["bbox"][2] / size[a["image_id"]][0], a["bbox"][3] / size[a["image_id"]][1]]
                    for a in train["annotations"]]).mean(0)
    val_file = root / "annotations" / "instances_val.json"
    val = json.loads(val_file.read_text())
    dets = [{"image_id": i["id"], "category_id": 1, "score": 1.0,
             "bbox": [float(rel[0] * i["width"]), float(rel[1] * i["height"]),
                      float(rel[2] * i["width"]), float(rel[3] * i["height"])]} for i in val["images"]]
    return {**coco_scores(val_file, dets), "box_rel_xywh": rel.tolist()}


@torch.no_grad()
def evaluate_run(run: Path, root: Path) -> dict:
    """AP of the run's final weights on the val photos, scored by pycocotools from the files on disk."""
    from vitkit.source import load_model

    lm = load_model(str(run))
    lm.model.eval()
    cat_ids = json.loads((run / "run.json").read_text()).get("category_ids") or list(range(1, lm.num_classes + 1))
    val_file = root / "annotations" / "instances_val.json"
    val = json.loads(val_file.read_text())
    dets = []
    t0 = time.perf_counter()
    for info in val["images"]:
        img = Image.open(root / "images" / info["file_name"]).convert("RGB")
        x = lm.transform(img)
        sx, sy = img.width / x.shape[-1], img.height / x.shape[-2]
        d = lm.detect(x[None])[0]
        for (x0, y0, x1, y1), s, c in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()):
            dets.append({"image_id": info["id"], "category_id": int(cat_ids[c]), "score": float(s),
                         "bbox": [x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy]})
    eval_s = time.perf_counter() - t0
    return {**coco_scores(val_file, dets), "eval_img_s": len(val["images"]) / eval_s,
            "params": sum(p.numel() for p in lm.model.parameters()), "img_size": lm.transform.size}


def pretrain(budget: str, run_root: Path) -> dict:
    """The detectors' backbone: the cifar10_fast recipe on the shared CIFAR-10 for ``budget``."""
    from vitkit.engine.budget import parse_duration

    out = run_root / "pretrain-cifar10"
    tr = cli_train(str(CIFAR), out, ["--recipe", "cifar10_fast", f"engine.time_budget={budget}",
                                     "engine.tensorboard=false", "engine.plots=false"])
    s = tr["summary"]
    return {"weights": str(out / "model.safetensors"), "recipe": "cifar10_fast", "data": "CIFAR-10 (shared, 50k train)",
            "test_acc": s.get("val_acc"), "budget_s": parse_duration(budget), "wall_s": tr["wall_s"],
            "epochs": s.get("epochs"), "command": tr["command"]}


def row(model: str, budget: str, root: Path, run_root: Path, init: str | None, extra: list[str]) -> dict:
    from vitkit.engine.budget import parse_duration

    out = run_root / f"{model}-{budget}"
    args = [f"engine.time_budget={budget}", f"model.head={model}", *BACKBONE, *extra]
    if init:
        args.append(f"model.init={init}")
    tr = cli_train(str(root), out, args)
    ev = evaluate_run(out, root)
    s = tr["summary"]
    return {
        "model": model, "backbone": BACKBONE[0].split("=", 1)[1],
        "init": f"vitkit supervised pretraining on CIFAR-10 ({init})" if init else "random (from scratch)",
        **{k: ev[k] for k in ("ap", "ap50", "ap75", "ap_medium", "ap_large", "ar100", "params", "eval_img_s",
                              "img_size")},
        "train_img_s": s.get("train_img_per_s"), "wall_s": tr["wall_s"], "budget_s": parse_duration(budget),
        "steps": s.get("steps"), "epochs": s.get("epochs"), "val_ap_vitkit": s.get("best_metric_value"),
        "plan": tr["run_info"].get("plan"), "command": tr["command"], "run_dir": str(out),
    }


def synthetic(model: str, budget: str, run_root: Path, extra: list[str], n: int = 4000) -> dict:
    """``model`` trained on ``scenes:n`` (0-6 shapes per 128 px image, 6 classes) for ``budget``, from
    scratch; scored by vitkit's COCO evaluator (pycocotools) on the scenes' own val split."""
    from vitkit.engine.budget import parse_duration

    out = run_root / f"scenes-{model}-{budget}"
    tr = cli_train(f"scenes:{n}", out, ["--task", "detect", f"model.head={model}", f"engine.time_budget={budget}",
                                        *extra])
    s = tr["summary"]
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"val"' in line][-1]
    print(f"scenes {model}: AP50 {last['ap50']:.3f}, AP {last['ap']:.3f}", flush=True)
    return {"ap": last["ap"], "ap50": last["ap50"], "ap75": last["ap75"], "budget_s": parse_duration(budget),
            "wall_s": tr["wall_s"], "steps": s.get("steps"), "epochs": s.get("epochs"),
            "train_img_s": s.get("train_img_per_s"), "plan": tr["run_info"].get("plan"), "command": tr["command"]}


def plot(result: dict, root: Path, path: Path) -> None:
    """Predictions of the best row on four val photos (each photo's best box and any other scoring at
    least 0.5; ground truth dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitkit.source import load_model

    rows = [r for r in result["rows"] if r.get("run_dir")]
    if not rows:
        return
    best = max(rows, key=lambda r: r["ap"])
    lm = load_model(best["run_dir"])
    val = json.loads((root / "annotations" / "instances_val.json").read_text())
    gts = {}
    for a in val["annotations"]:
        gts.setdefault(a["image_id"], []).append(a["bbox"])
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    for ax, info in zip(axes, val["images"][:: max(1, len(val["images"]) // 4)]):
        img = Image.open(root / "images" / info["file_name"]).convert("RGB")
        x = lm.transform(img)
        sx, sy = img.width / x.shape[-1], img.height / x.shape[-2]
        d = lm.detect(x[None])[0]
        ax.imshow(img)
        for gx, gy, gw, gh in gts.get(info["id"], []):
            ax.add_patch(plt.Rectangle((gx, gy), gw, gh, fill=False, ec="white", lw=1.5, ls="--"))
        for i, ((x0, y0, x1, y1), s) in enumerate(zip(d["boxes"].tolist(), d["scores"].tolist())):
            if i == 0 or s >= 0.5:  # best first
                ax.add_patch(plt.Rectangle((x0 * sx, y0 * sy), (x1 - x0) * sx, (y1 - y0) * sy, fill=False,
                                           ec="#e8702a", lw=2))
                ax.text(x0 * sx, y0 * sy - 3, f"raccoon {s:.2f}", color="#e8702a", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{best['model']} ({best['budget_s'] / 60:g} min on 2 CPU cores): val AP {best['ap']:.3f}; "
                 "best box and others >= 0.5; dashed: ground truth", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    from vitkit.engine.budget import parse_duration

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="an extracted raccoon/ folder (default: the shared archive)")
    ap.add_argument("--models", default=",".join(MODELS), help="detector rows to run ('none': no rows)")
    ap.add_argument("--budget", default="20m", help="wall-clock budget per detector row")
    ap.add_argument("--pretrain", default=None, metavar="BUDGET", help="pretrain the backbone first (e.g. 30m)")
    ap.add_argument("--init", default=None, help="backbone weights for the rows (default: the JSON's pretraining)")
    ap.add_argument("--no-flag", default="skip", help="'plan' (the plan's own budget), a duration, or 'skip'")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every row")
    ap.add_argument("--run-root", default=None)
    ap.add_argument("--synthetic", default=None, metavar="MODEL:BUDGET",
                    help="train MODEL on the built-in scenes (several shapes per image) for BUDGET instead")
    ap.add_argument("--add-quiet-report", default=None, metavar="R.json",
                    help="only merge quiet-run's report of the last invocation into the JSON, then exit")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    root = raccoon_root(args.data)
    run_root = Path(args.run_root or REPO / "runs" / f"detect-raccoon-{time.strftime('%Y%m%d-%H%M%S')}")
    old = RESULTS / args.out
    result = json.loads(old.read_text()) if old.is_file() else {"rows": [], "no_flag": None}
    if args.add_quiet_report:
        result.setdefault("quiet_run", []).append(json.loads(Path(args.add_quiet_report).read_text()))
        write_json(args.out, result)
        return
    if args.synthetic:
        model, budget = args.synthetic.split(":")
        result.setdefault("synthetic", {})[model] = synthetic(model, budget, run_root, args.set)
        write_json(args.out, result)
        return
    result.update({"benchmark": "detect_raccoon", "data": str(root), "budget": args.budget, "machine": machine(),
                   "versions": versions()})
    t0 = time.time()
    result["baseline_constant_box"] = constant_box(root)
    print(f"constant box: AP {result['baseline_constant_box']['ap']:.3f}, AP50 "
          f"{result['baseline_constant_box']['ap50']:.3f}", flush=True)
    if args.pretrain:
        result["pretraining"] = pretrain(args.pretrain, run_root)
        print(f"pretraining: CIFAR-10 test acc {result['pretraining']['test_acc']}", flush=True)
        write_json(args.out, result)
    init = args.init or (result.get("pretraining") or {}).get("weights")
    if args.no_flag != "skip":
        extra = [] if args.no_flag == "plan" else [f"engine.time_budget={args.no_flag}"]
        out = run_root / "no-flag"
        tr = cli_train(str(root), out, extra)
        ev = evaluate_run(out, root)
        planned = ((tr["run_info"].get("plan") or {}).get("engine.time_budget") or {}).get("value")
        result["no_flag"] = {**{k: ev[k] for k in ("ap", "ap50", "ap75", "ar100", "params", "img_size")},
                             "wall_s": tr["wall_s"], "budget_s": parse_duration(extra[0].split("=")[1] if extra
                                                                                else planned) if (extra or planned)
                             else None, "train_img_s": tr["summary"].get("train_img_per_s"),
                             "plan": tr["run_info"].get("plan"), "command": tr["command"], "run_dir": str(out)}
        print(f"no-flag: AP {ev['ap']:.3f}, AP50 {ev['ap50']:.3f}", flush=True)
        write_json(args.out, result)
    for model in [m for m in args.models.split(",") if m and m != "none"]:
        r = row(model, args.budget, root, run_root, init, args.set)
        result["rows"] = [x for x in result["rows"] if x["model"] != model] + [r]
        print(f"{model}: AP {r['ap']:.3f}, AP50 {r['ap50']:.3f}, AP75 {r['ap75']:.3f}, {r['train_img_s']:.1f} img/s",
              flush=True)
        write_json(args.out, result)
    done = {r["model"] for r in result["rows"]}
    result["complete"] = set(MODELS) <= done and result.get("no_flag") is not None
    result["wall_s_last_invocation"] = time.time() - t0
    write_json(args.out, result)
    plot(result, root, RESULTS / "detect_raccoon.png")


if __name__ == "__main__":
    main()
