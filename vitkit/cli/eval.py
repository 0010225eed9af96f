"""`vitkit eval RUN_DIR|WEIGHTS --data PATH`: accuracy, worst classes, confusion matrix."""

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
        out_dir=args.out, use_ema=args.ema, tta=args.tta,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['model']} on {result['data']} ({result['split']}, {result['n']} images)")
    print(f"  top-1 {result['top1']:.2%}   top-5 {result['top5']:.2%}   balanced {result['balanced_acc']:.2%}")
    worst = sorted(result["per_class"].items(), key=lambda kv: kv[1])[:5]
    if len(result["per_class"]) > 1:
        print("  worst classes: " + ", ".join(f"{name} {acc:.1%}" for name, acc in worst))
    print(f"  wrote {result['eval_json']} and {result['confusion_png']}")
    return 0
