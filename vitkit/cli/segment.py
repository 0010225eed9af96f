"""`vitkit segment SOURCE IMAGE`: masks from a promptable (SAM) model for points and a box, or with --auto
every mask it finds; writes mask_K.png, overlay.png and masks.json."""

from __future__ import annotations

import argparse
import json


def _pair(text: str) -> tuple[float, float]:
    return _numbers(text, 2, "a point is x,y in pixels, e.g. 120,80")


def _quad(text: str) -> tuple[float, ...]:
    return _numbers(text, 4, "a box is x0,y0,x1,y1 in pixels, e.g. 10,20,200,160")


def _numbers(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"{text!r}: {what}")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="masks from a SAM model for clicked points and a box, or all masks (--auto)")
    p.add_argument("source", metavar="SOURCE", help="a SAM run directory or weights (vitkit, segment-anything "
                                                    "or transformers layout)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--point", action="extend", nargs="+", type=_pair, metavar="X,Y",
                   help="a point prompt in pixels (repeat or list several)")
    p.add_argument("--label", action="extend", nargs="+", type=int, choices=(0, 1), metavar="1|0",
                   help="one per point: 1 foreground (default), 0 background")
    p.add_argument("--box", type=_quad, metavar="X0,Y0,X1,Y1", help="a box prompt in pixels")
    p.add_argument("--auto", action="store_true", help="every mask from a grid of point prompts")
    p.add_argument("--out", metavar="DIR", help="where the files go (default: <image name>_sam)")
    mm = p.add_mutually_exclusive_group()
    mm.add_argument("--multimask", dest="multimask", action="store_true", default=True,
                    help="three candidate masks per prompt (default)")
    mm.add_argument("--single", dest="multimask", action="store_false", help="one mask per prompt")
    auto = p.add_argument_group("--auto options (segment-anything's defaults)")
    auto.add_argument("--points-per-side", type=int, default=32, metavar="N", help="grid of N x N points (32)")
    auto.add_argument("--pred-iou-thresh", type=float, default=0.88, metavar="T",
                      help="keep masks whose predicted IoU is above T (0.88)")
    auto.add_argument("--stability-score-thresh", type=float, default=0.95, metavar="T",
                      help="keep masks whose stability score is at least T (0.95)")
    auto.add_argument("--box-nms-thresh", type=float, default=0.7, metavar="T",
                      help="drop a mask whose box overlaps a better one's by IoU above T (0.7)")
    auto.add_argument("--min-mask-region-area", type=int, default=0, metavar="PX",
                      help="fill holes and drop islands smaller than PX pixels (0: off)")
    p.add_argument("--json", action="store_true", help="print masks.json on stdout")
    p.set_defaults(func=run_segment)


def run_segment(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..segment import segment

    if args.label and not args.point:
        raise ConfigError("--label needs --point: one label per point")
    if args.label and len(args.label) != len(args.point):
        raise ConfigError(f"{len(args.point)} --point but {len(args.label)} --label: give one label per point "
                          "(or none: all foreground)")
    options = {}
    if args.auto:
        options = {"points_per_side": args.points_per_side, "pred_iou_thresh": args.pred_iou_thresh,
                   "stability_score_thresh": args.stability_score_thresh, "box_nms_thresh": args.box_nms_thresh,
                   "min_mask_region_area": args.min_mask_region_area}
    result = segment(args.source, args.image, points=args.point, labels=args.label, box=args.box, auto=args.auto,
                     multimask=args.multimask, out_dir=args.out, **options)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    masks = result["masks"]
    print(f"{result['image']}: {len(masks)} mask{'s' if len(masks) != 1 else ''}")
    for k, m in enumerate(masks):
        star = "*" if k == result["best"] and result["mode"] == "prompt" else " "
        print(f" {star}{m['file']}  predicted IoU {m['predicted_iou']:.3f}  area {m['area']} px")
    print(f"  overlay: {result['overlay']}")
    return 0
