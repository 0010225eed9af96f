"""`vitkit demo WEIGHTS|RUN_DIR`: a local web app to classify images and see the maps (needs vitkit[demo])."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="serve a local web app: upload an image, see the top-5 and attention maps")
    p.add_argument("source", metavar="WEIGHTS|RUN_DIR", help="a .safetensors file, run directory or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--examples", nargs="*", default=[], metavar="IMAGE", help="images offered as examples")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import PathNotFoundError
    from ..interpret.demo import launch_demo

    for image in args.examples:
        if not Path(image).is_file():
            raise PathNotFoundError(f"no such file: example image {image}")
    launch_demo(args.source, host=args.host, port=args.port, examples=args.examples)
    return 0
