"""`vitkit predict WEIGHTS|RUN_DIR IMAGE...`: the most probable classes of each image."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images with a run or weights file")
    p.add_argument("source", metavar="WEIGHTS|RUN_DIR", help="a .safetensors file, run directory or checkpoint directory")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from ..predict import predict

    results = predict(args.source, args.images, topk=args.topk)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(r["path"])
        for t in r["top"]:
            print(f"  {t['prob']:7.2%}  {t['label']}")
    return 0
