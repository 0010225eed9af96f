"""`vitkit pretrain --method mae|dino|ibot|simclr|mocov3`: self-supervised pretraining (no labels)."""

from __future__ import annotations

import argparse
import os
import shlex

from ..errors import ConfigError
from ..rundir import WEIGHTS
from .resume import resume_plan


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..pretrain import METHODS

    p = sub.add_parser(
        "pretrain", help="self-supervised pretraining without labels (MAE, DINO, iBOT, SimCLR, MoCo v3)",
        description="Pretrain a backbone without labels. Method defaults, then --data/--model/--out, then "
                    "key=value overrides (objective.* keys: vitkit pretrain --method M --show-config).",
        epilog="examples:\n  vitkit pretrain --method mae\n  vitkit pretrain --method dino --data /data/cifar10 "
               "engine.time_budget=30m\n  vitkit probe runs/RUN --data /data/cifar10 --method knn",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", required=True, choices=METHODS, help="the self-supervised objective")
    p.add_argument("--data", help="dataset path, or 'shapes[:N]' (default: the built-in shapes)")
    p.add_argument("--model", help="backbone name (model.name); default: chosen from the data")
    p.add_argument("--out", help="run directory (engine.out_dir); default: runs/<time>-<model>-<data>")
    p.add_argument("--resume", nargs="?", const=True, metavar="CKPT",
                   help="continue the run in --out, or from CKPT (a checkpoint or run directory)")
    p.add_argument("--force", action="store_true", help="--out already holds a run: delete it and start over")
    p.add_argument("--show-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. objective.mask_ratio=0.6")
    p.set_defaults(func=run_pretrain, recipe=None, reschedule=False)


def run_pretrain(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from ..config import load_config
    from ..engine.distributed import init_distributed, shutdown_distributed
    from ..pretrain import pretrain_config
    from ..train import train

    base_run, resume, out = resume_plan(args)
    flags = [f"{k}={v}" for k, v in (("model.name", args.model), ("engine.out_dir", out)) if v is not None]
    if base_run is not None:  # a resumed run keeps its config.yaml; overrides apply on top
        if args.data:
            raise ConfigError("--data cannot change on --resume: the run keeps its data (drop --data)")
        cfg = load_config(str(base_run.config_file), flags + list(args.overrides))
        if cfg.objective.get("name") != args.method:
            raise ConfigError(f"{base_run.path} was pretrained with {cfg.objective.get('name')!r}, not --method {args.method}")
    else:
        cfg = pretrain_config(args.method, args.data, flags + list(args.overrides))
    args.cfg = cfg
    if args.show_config:
        if int(os.environ.get("RANK", 0)) == 0:
            from ..objectives import objective_keys

            print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
            keys = ", ".join(f"{k}={v}" for k, v in objective_keys(args.method).items())
            print(f"# objective.* keys of {args.method}: {keys}")
        return 0
    is_main = init_distributed().is_main
    try:
        summary = train(cfg, resume=resume, force=args.force)
    except BaseException:
        shutdown_distributed(wait=False)
        raise
    shutdown_distributed()
    if is_main:
        print(format_summary(summary, cfg.data.path))
    return 0


def format_summary(summary: dict, data: str) -> str:
    run, data = shlex.quote(summary["out_dir"]), shlex.quote(data)
    knn = summary.get("val_knn_acc")
    return "\n".join([
        f"done ({summary['stopped']}): {summary['steps']} steps in {summary['wall_s']:.1f} s, "
        f"k-NN accuracy {'n/a (no labels)' if knn is None else f'{knn:.2%}'}",
        f"run dir: {run} ({WEIGHTS}: the pretrained backbone)",
        "next:",
        f"  vitkit probe {run} --data {data} --method knn",
        f"  vitkit probe {run} --data {data} --method linear",
        f"  vitkit train --init {run}/{WEIGHTS} --data {data}   (fine-tune)",
    ])
