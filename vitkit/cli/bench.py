"""`vitkit bench MODEL`: img/s, latency, memory and FLOP efficiency; optionally against timm."""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated integers such as 1,32, got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="inference img/s, latency, peak memory and FLOP efficiency of a model")
    p.add_argument("model", metavar="MODEL", help="a registered model name, a run directory or a weights file")
    p.add_argument("--batch", default="1,32", help="batch sizes, comma-separated (default 1,32)")
    p.add_argument("--img-size", type=int, help="input size (default: the model's)")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16, fp16 (GPU) (default fp32)")
    p.add_argument("--tome", type=int, metavar="R", help="merge R tokens per block (ToMe)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager, saying why)")
    p.add_argument("--vs", choices=("timm",), help="also time the same model in timm, side by side")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    p.add_argument("--reps", type=int, default=10, help="timed calls per setting (default 10)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from ..efficient.bench import BenchConfig, bench, format_table

    cfg = BenchConfig(
        batches=_int_list(args.batch), img_size=args.img_size,
        precisions=[p.strip() for p in args.precision.split(",") if p.strip()], tome=args.tome,
        compile=args.compile, vs_timm=args.vs == "timm", warmup=args.warmup, reps=args.reps, device=args.device,
        threads=args.threads,
    )
    result = bench(args.model, cfg)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
