"""`vitkit eval RUN_DIR|WEIGHTS --data PATH`: accuracy, worst classes, confusion matrix; for a segmentation
run mIoU and per-class IoU, for a depth run AbsRel, RMSE and delta1."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="top-1/top-5, per-class accuracy and a confusion matrix of a run or weights file on a dataset",
    )
    p.add_argument("source", metavar="RUN_DIR|WEIGHTS", help="a run directory, checkpoint directory or .safetensors file")
    p.add_argument("--data", required=True, help="dataset path, or 'shapes[:N]'")
    p.add_argument("--split", default="val", choices=("val", "train"))
    p.add_argument("--task", help="read the data as this task (must be the model's: classify, segment or depth)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, help="loader processes (default: min(4, CPUs))")
    p.add_argument("--out", help="where eval.json and confusion_matrix.png go (default: the run directory)")
    p.add_argument("--ema", action="store_true", help="evaluate the run's EMA weights")
    p.add_argument("--tta", default="none", choices=("none", "hflip"),
                   help="test-time augmentation: hflip averages each image with its mirror image")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate

    result = evaluate(
        args.source, args.data, batch_size=args.batch_size, split=args.split, num_workers=args.workers,
        out_dir=args.out, use_ema=args.ema, tta=args.tta, task=args.task,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result.get("task") in ("segment", "depth"):
        print(format_dense(result))
        return 0
    print(f"{result['model']} on {result['data']} ({result['split']}, {result['n']} images)")
    print(f"  top-1 {result['top1']:.2%}   top-5 {result['top5']:.2%}   balanced {result['balanced_acc']:.2%}")
    worst = sorted(result["per_class"].items(), key=lambda kv: kv[1])[:5]
    if len(result["per_class"]) > 1:
        print("  worst classes: " + ", ".join(f"{name} {acc:.1%}" for name, acc in worst))
    print(f"  wrote {result['eval_json']} and {result['confusion_png']}")
    return 0


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
