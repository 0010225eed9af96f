"""`vitkit zeroshot RUN --data DIR`: zero-shot classification with a CLIP/SigLIP run: class names from the folders,
prompt templates ensembled; top-1/top-5 and a per-class table."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "zeroshot", help="zero-shot classification of labelled images with a CLIP/SigLIP run (class names as prompts)",
    )
    p.add_argument("source", metavar="RUN_DIR|WEIGHTS",
                   help="a CLIP/SigLIP run directory, checkpoint directory or model.safetensors (or open_clip/HF weights)")
    p.add_argument("--data", required=True, help="class folders (the folder names are the class names), or "
                                                 "captioned data with classes such as shapes-captions")
    p.add_argument("--templates", metavar="FILE",
                   help="prompt templates, one per line with {} for the class name (default: 'a photo of a {}.' ...)")
    p.add_argument("--split", default="all", choices=("all", "train", "val"),
                   help="all images (default), or the run's own train/val split of its data")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, help="loader processes (default: min(4, CPUs))")
    p.add_argument("--out", help="where zeroshot.json goes (default: the run directory, "
                                 "or the checkpoint's folder when one is named)")
    p.add_argument("--ema", action="store_true", help="use the run's EMA weights")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=run_zeroshot)


def run_zeroshot(args: argparse.Namespace) -> int:
    from ..evaluate_caption import zeroshot

    result = zeroshot(args.source, args.data, templates=args.templates, split=args.split,
                      batch_size=args.batch_size, num_workers=args.workers, out_dir=args.out, use_ema=args.ema)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_zeroshot(result))
    return 0


def format_zeroshot(result: dict) -> str:
    """The console report: top-1/top-5 against chance, then accuracy per class."""
    lines = [f"zero-shot {result['model']} on {result['data']} ({result['split']}, {result['n']} images, "
             f"{len(result['classes'])} classes, {len(result['templates'])} templates)",
             f"  top-1 {result['top1']:.2%}   top-{result['top5_k']} {result['top5']:.2%}   "
             f"(chance top-1 {result['chance_top1']:.2%})", "  top-1 per class:"]
    width = max(len(c) for c in result["per_class"]) if result["per_class"] else 0
    for name, acc in result["per_class"].items():
        lines.append(f"    {name:<{width}}  {acc:7.2%}")
    lines.append(f"  wrote {result['zeroshot_json']}")
    return "\n".join(lines)
