"""`vitkit predict WEIGHTS|RUN_DIR IMAGE...`: the most probable classes of each image; for a segmentation
run a mask PNG and a coloured overlay per image, for a depth run a 16-bit depth PNG and a coloured one, for
a detector a PNG with the boxes drawn (and the boxes as JSON on stdout)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images (or segment them, or predict depth) with a run or weights file")
    p.add_argument("source", metavar="WEIGHTS|RUN_DIR", help="a .safetensors file, run directory or checkpoint directory")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image")
    p.add_argument("--out", help="where mask, overlay and depth files go (default: the current folder)")
    p.add_argument("--task", help="the task the model must have (classify, segment, depth or detect)")
    p.add_argument("--threshold", type=float, default=0.3, help="detectors: the lowest score of a box to keep")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from ..predict import predict

    results = predict(args.source, args.images, topk=args.topk, out_dir=args.out, task=args.task,
                      threshold=args.threshold)
    if args.json or (results and "detections" in results[0]):  # a detector's boxes are JSON
        print(json.dumps(results, indent=2))
        return 0
    if results and "top" not in results[0]:
        for r in results:
            print(r["path"])
            if "mask" in r:
                top = ", ".join(f"{name} {share:.0%}" for name, share in list(r["classes"].items())[:5])
                print(f"  wrote {r['mask']} and {r['overlay']}  ({top})")
            elif r["space"] == "depth":
                print(f"  wrote {r['depth']} and {r['depth_color']}  (depth {r['depth_min']:.2f}-{r['depth_max']:.2f} m)")
            else:
                print(f"  wrote {r['depth']} and {r['depth_color']}  (relative inverse depth: scale and shift unknown)")
        return 0
    for r in results:
        print(r["path"])
        for t in r["top"]:
            print(f"  {t['prob']:7.2%}  {t['label']}")
    return 0
