"""`vitkit probe RUN_DIR|WEIGHTS --data PATH --method knn|linear`: accuracy of frozen features."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe", help="k-NN or linear-probe accuracy of a (pretrained) backbone's frozen features",
        description="k-NN (cosine, k in 10/20/200, T=0.07 weighting) or a linear classifier on frozen "
                    "features: train split -> validation split. Writes probe_<method>.json.",
        epilog="examples:\n  vitkit probe runs/my-dino --data /data/cifar10\n"
               "  vitkit probe model.safetensors --data shapes --method linear --epochs 20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="run directory, checkpoint directory or .safetensors weights file")
    p.add_argument("--data", required=True, help="labelled dataset path, or 'shapes[:N]'")
    p.add_argument("--method", default="knn", choices=("knn", "linear"))
    p.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch size")
    p.add_argument("--epochs", type=int, help="linear probe epochs (default 50)")
    p.add_argument("--lr", type=float, help="linear probe learning rate (default 0.1)")
    p.add_argument("--workers", type=int, help="loader processes (default min(4, CPUs))")
    p.add_argument("--out", help="where probe_<method>.json goes (default: next to the model)")
    p.set_defaults(func=run_probe)


def run_probe(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..errors import ConfigError
    from ..probe import LinearProbeConfig, probe

    cfg = LinearProbeConfig()
    for name in ("epochs", "lr", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    cfg = replace(cfg, **{k: getattr(args, k) for k in ("epochs", "lr") if getattr(args, k) is not None})
    r = probe(args.source, args.data, args.method, batch_size=args.batch_size, num_workers=args.workers,
              out_dir=args.out, linear=cfg)
    if args.method == "knn":
        accs = ", ".join(f"k={k}: {r[f'knn_acc_{k}']:.2%}" for k in (10, 20, 200))
        print(f"k-NN accuracy ({r['n_train']} train -> {r['n_val']} val images): {accs}")
    else:
        print(f"linear probe accuracy ({r['n_train']} train -> {r['n_val']} val images): {r['linear_acc']:.2%} "
              f"(train {r['linear_train_acc']:.2%})")
    print(f"wrote {r['json']}")
    return 0
