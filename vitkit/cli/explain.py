"""`vitkit explain WEIGHTS|RUN_DIR IMAGE...`: attention maps and structure as PNGs and an HTML report."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain", help="draw where a model looks (rollout, per-head attention, PCA, ...) as PNGs + index.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  vitkit explain runs/shapes cat.png\n"
               "  vitkit explain model.safetensors a.jpg b.jpg --method rollout --method heads --out maps",
    )
    p.add_argument("source", metavar="WEIGHTS|RUN_DIR", help="a .safetensors file, run directory or checkpoint directory")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    # Checked by the library (vitkit.interpret.explain.METHODS), so parsing needs no plotting imports.
    p.add_argument("--method", action="append", metavar="METHOD",
                   help="repeatable: rollout, grad-rollout, heads, attention, pos-embed, patch-grid, pca "
                        "(default: all but attention, skipping those the model cannot show)")
    p.add_argument("--out", default="explain", help="folder for the PNGs and index.html (default: ./explain)")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image (a DETR run: queries to show)")
    p.add_argument("--head-fusion", default="mean", choices=("mean", "max", "min"), help="rollout: how heads combine")
    p.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: lowest fraction of weights to drop")
    p.add_argument("--mass", type=float, default=0.6, help="heads: outline the top patches holding this attention mass")
    p.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..interpret.explain import explain

    if not 0 <= args.discard_ratio < 1:
        raise ConfigError(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    if not 0 < args.mass <= 1:
        raise ConfigError(f"--mass must be in (0, 1], got {args.mass}")
    if args.topk < 1:
        raise ConfigError(f"--topk must be >= 1, got {args.topk}")
    from ..source import load_model

    lm = load_model(args.source)
    if lm.is_detect:
        from ..predict import explain_queries

        for entry in explain_queries(lm, args.images, args.out, queries=args.topk):
            best = ", ".join(f"query {q['query']} {q['label']} {q['score']:.2f}" for q in entry["queries"][:3])
            print(f"{entry['path']}: wrote {entry['queries_png']} (decoder cross-attention; {best})")
        return 0
    if lm.is_dense:
        raise ConfigError(
            f"{args.source} is a {lm.task} model; explain shows where a classifier looks. See its predictions with "
            f"vitkit predict {args.source} IMAGE (mask and overlay) or vitkit demo {args.source}"
        )
    report = explain(
        lm, args.images, args.method, args.out, topk=args.topk, head_fusion=args.head_fusion,
        discard_ratio=args.discard_ratio, mass=args.mass,
    )
    for entry in report["images"]:
        best = entry["top"][0]
        print(f"{entry['path']}: {best['label']} ({best['prob']:.1%})")
    for m, reason in report["skipped"].items():
        print(f"skipped {m}: {reason}")
    print(f"wrote {report['index']}")
    return 0
