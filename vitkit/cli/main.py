"""`vitkit <command>`: a thin layer over library functions."""

from __future__ import annotations

import argparse
import sys

from . import eval as eval_cmd
from . import models as models_cmd
from . import predict as predict_cmd
from . import train as train_cmd

_COMMANDS = [train_cmd, eval_cmd, predict_cmd, models_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description="Vision transformers: build, train, evaluate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in _COMMANDS:
        cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"vitkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
