"""`vitkit models [PATTERN]` and `vitkit info NAME`."""

from __future__ import annotations

import argparse
import json

import torch

from ..errors import ConfigError
from ..models import create_model, get_model_card, list_models
from ..models.info import count_flops, model_info


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models with params, input size and GFLOPs")
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'deit_*'")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
    p.set_defaults(func=run_models)
    q = sub.add_parser("info", help="config, params per part, FLOPs, tokens and attention memory of a model")
    q.add_argument("name")
    q.add_argument("--res", type=int, nargs="*", help="resolutions to report (default: card size, 224, 384)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=run_info)


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def run_models(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    if not names:
        raise ConfigError(f"no model matches {args.pattern!r}; try `vitkit models` for the full list")
    print(f"{'name':40s} {'params':>9s} {'input':>11s} {'GFLOPs':>8s}")
    for name in names:
        card = get_model_card(name)
        with torch.device("meta"):
            model = create_model(name).eval()
        params = sum(p.numel() for p in model.parameters())
        flops = "" if args.no_flops else f"{count_flops(model, card.input_size) / 1e9:8.2f}"
        size = "x".join(str(s) for s in card.input_size)
        print(f"{name:40s} {_fmt_params(params):>9s} {size:>11s} {flops:>8s}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    info = model_info(args.name, tuple(args.res) if args.res else None)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    card = info["card"]
    print(f"{info['name']}  ({card['paper']})")
    width = f"embed_dim {info['embed_dim']}, depth {info['depth']}, heads {info['num_heads']}"
    if not info["num_heads"]:  # a backbone without ViT blocks
        width = f"features {info['embed_dim']}, {info['depth']} feature stages"
    print(f"  {width}, "
          f"input {'x'.join(map(str, card['input_size']))}, classes {card['num_classes']}")
    print(f"  mean {card['mean']}, std {card['std']}, crop_pct {card['crop_pct']}, weights: {card['hub_id'] or 'none'}")
    cfg = ", ".join(f"{k}={v}" for k, v in info["config"].items())
    print(f"  config: {cfg}")
    print(f"\n  parameters: {info['params']:,} ({_fmt_params(info['params'])})")
    for part, n in info["params_per_part"].items():
        print(f"    {part:24s} {n:>14,}")
    if "tokens" not in info["resolutions"][0]:
        print(f"\n  {'res':>5s} {'GFLOPs':>9s} {'GMACs':>8s}")
        for r in info["resolutions"]:
            print(f"  {r['resolution']:>5d} {r['gflops']:>9.2f} {r['gmacs']:>8.2f}")
        print("\n  GMACs are multiply-adds (the 'FLOPs' of most papers); GFLOPs = 2 x GMACs.")
        return 0
    print(f"\n  {'res':>5s} {'grid':>7s} {'tokens':>7s} {'GFLOPs':>9s} {'GMACs':>8s} {'attn MiB/layer fp32':>20s} {'bf16':>8s}")
    for r in info["resolutions"]:
        grid = "x".join(map(str, r["grid"]))
        print(f"  {r['resolution']:>5d} {grid:>7s} {r['tokens']:>7d} {r['gflops']:>9.2f} {r['gmacs']:>8.2f} "
              f"{r['attn_matrix_mib_fp32_per_layer']:>20.2f} {r['attn_matrix_mib_bf16_per_layer']:>8.2f}")
    if len(info["resolutions"][0]["stages"]) > 1:
        print(f"\n  {'res':>5s} {'stage':>5s} {'grid':>7s} {'tokens':>7s} {'keys/query':>10s} {'GFLOPs':>9s} "
              f"{'attn MiB/layer fp32':>20s}")
        for r in info["resolutions"]:
            for st in r["stages"]:
                grid = "x".join(map(str, st["grid"]))
                print(f"  {r['resolution']:>5d} {st['stage']:>5d} {grid:>7s} {st['tokens']:>7d} "
                      f"{st['keys_per_query']:>10d} {st['gflops']:>9.2f} {st['attn_matrix_mib_fp32_per_layer']:>20.2f}")
    print("\n  GMACs are multiply-adds (the 'FLOPs' of most papers); GFLOPs = 2 x GMACs.")
    print("  Attention memory: one layer's softmax(QK^T) for batch 1, heads x queries x keys (all windows) values.")
    return 0
