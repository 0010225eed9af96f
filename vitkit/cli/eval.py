"""`vitkit eval RUN_DIR|WEIGHTS --data PATH`: accuracy, worst classes, confusion matrix; for a segmentation
run mIoU and per-class IoU, for a depth run AbsRel, RMSE and delta1, for a detector COCO AP."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="top-1/top-5, per-class accuracy and a confusion matrix of a run or weights file on a dataset",
    )
    p.add_argument("source", metavar="RUN_DIR|WEIGHTS", help="a run directory, checkpoint directory or .safetensors file")
    p.add_argument("--data", help="dataset path, or 'shapes[:N]' (default for a run: the data it trained on)")
    p.add_argument("--split", default="val", choices=("val", "train"))
    p.add_argument("--task", help="read the data as this task (must be the model's: classify, segment, depth or detect)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, help="loader processes (default: min(4, CPUs))")
    p.add_argument("--out", help="where eval.json and confusion_matrix.png go (default: the run directory, "
                                 "or the checkpoint's folder when one is named)")
    p.add_argument("--ema", action="store_true", help="evaluate the run's EMA weights")
    p.add_argument("--tta", default=None, choices=("none", "hflip"),
                   help="test-time augmentation: hflip averages each image with its mirror image "
                        "(default: as the run evaluated, its objective.tta)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..evaluate import evaluate

    data = args.data or _run_data(args.source)
    if data is None:
        raise ConfigError(f"--data is needed: {args.source} is not a run directory that names its data")
    result = evaluate(
        args.source, data, batch_size=args.batch_size, split=args.split, num_workers=args.workers,
        out_dir=args.out, use_ema=args.ema, tta=args.tta, task=args.task,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result.get("task") in ("segment", "depth"):
        print(format_dense(result))
        return 0
    if result.get("task") == "detect":
        print(format_detect(result))
        return 0
    print(f"{result['model']} on {result['data']} ({result['split']}, {result['n']} images)")
    print(f"  top-1 {result['top1']:.2%}   top-5 {result['top5']:.2%}   balanced {result['balanced_acc']:.2%}")
    worst = sorted(result["per_class"].items(), key=lambda kv: kv[1])[:5]
    if len(result["per_class"]) > 1:
        print("  worst classes: " + ", ".join(f"{name} {acc:.1%}" for name, acc in worst))
    print(f"  wrote {result['eval_json']} and {result['confusion_png']}")
    return 0


def _run_data(source: str) -> str | None:
    """The data a run directory trained on (its config's data.path), or None."""
    from pathlib import Path

    from ..rundir import RunDir

    run = RunDir(Path(source))
    if not run.is_run():
        return None
    return (run.read_config().get("data") or {}).get("path")


def format_detect(result: dict) -> str:
    """The console report of a detector's evaluation: COCO AP and AP per class."""
    def pct(v):
        return "  n/a" if v is None or v < 0 else f"{v:5.1%}"

    lines = [f"{result['model']} on {result['data']} ({result['split']}, {result['n']} images)",
             f"  AP {pct(result.get('ap'))}   AP50 {pct(result.get('ap50'))}   AP75 {pct(result.get('ap75'))}",
             f"  AP small {pct(result.get('ap_small'))}   medium {pct(result.get('ap_medium'))}   "
             f"large {pct(result.get('ap_large'))}   AR@100 {pct(result.get('ar100'))}"]
    per_class = result.get("per_class_ap") or {}
    if per_class:
        lines.append("  AP per class:")
        width = max(len(c) for c in per_class)
        for name, ap in per_class.items():
            lines.append(f"    {name:<{width}}  {'absent' if ap is None else pct(ap)}")
    lines.append(f"  wrote {result['eval_json']}")
    return "\n".join(lines)


def format_dense(result: dict) -> str:
    """The console report of a segmentation or depth evaluation."""
    head = f"{result['model']} on {result['data']} ({result['split']}, {result['n']} images)"
    if result["task"] == "depth":
        lines = [head, f"  AbsRel {result['absrel']:.4f}   RMSE {result['rmse']:.4f}   delta1 {result['delta1']:.2%}"]
    else:
        lines = [head, f"  mIoU {result['miou']:.2%}   pixel accuracy {result['pixel_acc']:.2%}", "  per-class IoU:"]
        width = max(len(c) for c in result["per_class_iou"])
        for name, iou in result["per_class_iou"].items():
            lines.append(f"    {name:<{width}}  {'absent' if iou is None else f'{iou:.2%}'}")
    wrote = [result["eval_json"]] + ([result["confusion_png"]] if "confusion_png" in result else [])
    lines.append(f"  wrote {' and '.join(wrote)}")
    return "\n".join(lines)
