"""`vitkit <command>`: a thin layer over library functions.

Errors a user can fix (:class:`vitkit.errors.VitkitError`, and a missing or unreadable path
they named) print one ``vitkit <cmd>: error: ...`` message and exit 2. Anything else is a bug:
the CLI says so, writes the traceback to a log file and exits 1. ``--debug`` re-raises
instead, with the traceback.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import tempfile
import traceback
from pathlib import Path

from ..errors import VitkitError
from ..rundir import RunDir
from . import bench as bench_cmd
from . import demo as demo_cmd
from . import eval as eval_cmd
from . import explain as explain_cmd
from . import export as export_cmd
from . import models as models_cmd
from . import predict as predict_cmd
from . import pretrain as pretrain_cmd
from . import probe as probe_cmd
from . import retrieve as retrieve_cmd
from . import sample as sample_cmd
from . import segment as segment_cmd
from . import train as train_cmd
from . import zeroshot as zeroshot_cmd

_COMMANDS = [
    train_cmd, pretrain_cmd, eval_cmd, zeroshot_cmd, retrieve_cmd, probe_cmd, predict_cmd, explain_cmd, demo_cmd,
    segment_cmd, sample_cmd, models_cmd, export_cmd, bench_cmd,
]
# OS errors about a path the user named: a typo or a permission, not a bug.
_USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description="Vision transformers: build, train, evaluate.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of any error (may also follow the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in _COMMANDS:
        cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is global, but accepted anywhere on the line (people add it after the command).
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    prog = f"vitkit {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except (VitkitError, *_USER_OS_ERRORS) as e:
        if debug:
            raise
        print(f"{prog}: error: {_message(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the last line of defence: report a bug, keep the traceback
        if debug:
            raise
        log = _write_traceback(args)
        print(
            f"{prog}: internal error (a bug): {type(e).__name__}: {_message(e)}; the traceback is in {log}; "
            "please report it (rerun with --debug to see it here)",
            file=sys.stderr,
        )
        return 1


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and not isinstance(e, VitkitError):
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return str(e) or type(e).__name__


def _write_traceback(args: argparse.Namespace) -> str:
    """Write the current exception's traceback to ``<run dir>/error.log``, else a temp file; return its path."""
    text = traceback.format_exc()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidates = []
    cfg = getattr(args, "cfg", None)
    out = cfg.engine.out_dir if cfg is not None else getattr(args, "out", None)
    if out and Path(out).is_dir():
        candidates.append(RunDir(out).error_log)
    candidates.append(Path(tempfile.gettempdir()) / f"vitkit-{args.command}-{stamp}-{os.getpid()}.log")
    for path in candidates:
        try:
            path.write_text(text)
            return str(path)
        except OSError:
            continue
    return "(no writable place; rerun with --debug)"


if __name__ == "__main__":
    sys.exit(main())
