"""`vitkit retrieve RUN --data captions.jsonl`: image->text and text->image recall@k of a CLIP/SigLIP run."""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise ConfigError(f"--k takes comma-separated positive integers such as 1,5,10, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise ConfigError(f"--k takes comma-separated positive integers such as 1,5,10, got {text!r}")
    return ks


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrieve", help="image-text retrieval recall@k of a CLIP/SigLIP run on captioned images")
    p.add_argument("source", metavar="RUN_DIR|WEIGHTS",
                   help="a CLIP/SigLIP run directory, checkpoint directory or model.safetensors (or open_clip/HF weights)")
    p.add_argument("--data", required=True, help="captioned images: a captions.jsonl/.csv (image + caption or "
                                                 "captions), a folder holding one, WebDataset jpg+txt shards")
    p.add_argument("--k", default="1,5,10", help="recall cut-offs, comma-separated (default 1,5,10)")
    p.add_argument("--split", default="all", choices=("all", "train", "val"),
                   help="all images (default), or the run's own train/val split of its data")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, help="loader processes (default: min(4, CPUs))")
    p.add_argument("--out", help="where retrieve.json goes (default: the run directory, "
                                 "or the checkpoint's folder when one is named)")
    p.add_argument("--ema", action="store_true", help="use the run's EMA weights")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=run_retrieve)


def run_retrieve(args: argparse.Namespace) -> int:
    from ..evaluate_caption import retrieve

    result = retrieve(args.source, args.data, ks=_ks(args.k), split=args.split, batch_size=args.batch_size,
                      num_workers=args.workers, out_dir=args.out, use_ema=args.ema)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_retrieve(result))
    return 0


def format_retrieve(result: dict) -> str:
    """The console report: a recall table, both directions, against chance."""
    ks = result["ks"]
    head = "".join(f"   R@{k:<5}" for k in ks)
    lines = [f"retrieval {result['model']} on {result['data']} ({result['split']}, {result['n_images']} images, "
             f"{result['n_texts']} captions)", f"  {'':14}{head}"]
    for d, name in (("i2t", "image->text"), ("t2i", "text->image")):
        row = "".join(f"   {result[f'{d}_r{k}']:6.1%}" for k in ks)
        chance = "".join(f"   {result['chance'][f'{d}_r{k}']:6.1%}" for k in ks)
        lines += [f"  {name:<14}{row}", f"  {'  chance':<14}{chance}"]
    lines.append(f"  mean recall {result['r_mean']:.1%}; wrote {result['retrieve_json']}")
    return "\n".join(lines)
