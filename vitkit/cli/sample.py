"""`vitkit sample RUN --class 3 --n 64 --steps 8`: class-conditional images from a generative run as a PNG grid."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="draw class-conditional images from a MaskGIT, VAR or DiT run into a PNG grid",
        description="Draw images with the run's own sampler; steps and guidance default to the run's "
                    "objective.sample_steps and objective.guidance.",
        epilog="examples:\n  vitkit sample runs/maskgit --class 3 --n 64 --steps 8\n"
               "  vitkit sample runs/dit --n 100 --guidance 2 --out grid.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="RUN", help="a maskgit, var or dit run directory, checkpoint or model.safetensors")
    p.add_argument("--class", dest="classes", action="append", metavar="CLASS",
                   help="a class id or name (repeat for several); default: every class, one per grid row")
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--steps", type=int, help="decoding (MaskGIT) or integration (DiT) steps; VAR has its scales")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale: 1 conditional, 0 unconditional, >1 stronger")
    p.add_argument("--seed", type=int, default=0, help="the same seed draws the same images (default 0)")
    p.add_argument("--out", metavar="PNG", help="where the grid goes (default: RUN/samples/sample_<class>_seed<S>.png)")
    p.add_argument("--tokenizer", metavar="RUN",
                   help="the VQ tokenizer run, for a weights file that does not record it")
    p.add_argument("--device", help="cpu, cuda or auto (default)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    from ..sample import sample

    result = sample(args.source, classes=args.classes, n=args.n, steps=args.steps, guidance=args.guidance,
                    seed=args.seed, out=args.out, tokenizer=args.tokenizer, device=args.device)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    what = ", ".join(result["classes"])
    print(f"{result['n']} {result['kind']} samples of {what} ({result['steps']} steps, guidance {result['guidance']}, "
          f"seed {result['seed']}) in {result['seconds']:.2f} s ({result['s_per_image'] * 1000:.1f} ms per image)")
    print(f"wrote {result['path']}")
    return 0
