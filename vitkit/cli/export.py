"""`vitkit export RUN_DIR|WEIGHTS --format onnx|safetensors|pt2 [--merge]`: write a deployable model and check it."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a run or weights file to ONNX, torch.export (.pt2) or safetensors, checked against torch",
    )
    p.add_argument("source", metavar="RUN_DIR|WEIGHTS", help="a run directory, checkpoint directory or .safetensors file")
    p.add_argument("--format", choices=("onnx", "safetensors", "pt2"),
                   help="default: onnx; with --merge, safetensors")
    p.add_argument("--merge", action="store_true",
                   help="a parameter-efficient fine-tuning run as a plain model: LoRA folded into the base weights "
                        "(loads in timm or vitkit without the run); VPT and AdaptFormer cannot merge")
    p.add_argument("--out", help="output file (default: model.<format> in the run directory or beside the weights)")
    p.add_argument("--dynamic-batch", action="store_true", help="a symbolic batch dimension (onnx, pt2)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--img-size", type=int, help="input size to export at (default: the model's)")
    p.add_argument("--ema", action="store_true", help="export the run's EMA weights")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from ..export import export

    fmt = args.format or ("safetensors" if args.merge else "onnx")
    result = export(
        args.source, fmt, args.out, dynamic_batch=args.dynamic_batch, opset=args.opset,
        img_size=args.img_size, use_ema=args.ema, merge=args.merge,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {result['path']} ({result['format']}, {result['model']})")
        if "merged" in result:
            print(f"  {result['merged']} merged into the base weights: max abs diff vs the unmerged model "
                  f"{result['merge_max_abs_diff']:.3g}")
        print(f"  checked on a batch of {result['checked_batch']}: max abs diff vs torch {result['max_abs_diff']:.3g} "
              f"(tolerance {result['tolerance']:g})")
    if not result["ok"]:
        print(f"vitkit export: the exported model differs from torch by {result['max_abs_diff']:.3g}, more than "
              f"{result['tolerance']:g}; do not deploy it, and please report this", file=sys.stderr)
        return 1
    return 0
