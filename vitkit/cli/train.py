"""`vitkit train`: train from a recipe, flags and ``key=value`` overrides (also under torchrun)."""

from __future__ import annotations

import argparse
import os
import shlex

from ..errors import ConfigError
from ..rundir import BAD_FILES
from .resume import resume_plan

_FLAG_KEYS = (("data", "data.path"), ("model", "model.name"), ("out", "engine.out_dir"), ("init", "model.init"),
              ("task", "data.task"), ("head", "model.head"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model (run under torchrun for several processes)",
        description="Train from dataclass defaults, then --recipe, then the flags, then key=value overrides.",
        epilog="examples:\n  vitkit train --data shapes\n  vitkit train --recipe deit_tiny_cifar10 --data /data/cifar10 "
               "engine.epochs=50\n  vitkit train --resume --out runs/my-run engine.epochs=200",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", help="recipe name or YAML file")
    p.add_argument("--data", help="dataset path, or 'shapes[:N]' / 'scenes[:N]' / 'depth-scenes[:N]' for the "
                                  "built-in data (data.path)")
    p.add_argument("--task", help="what to train (data.task): classify, segment, depth, detect, caption, "
                                  "promptable (SAM-style masks from points and boxes) or generate (objective.name="
                                  "vqvae|maskgit|var|dit on class folders); default: "
                                  "detected from the data (class folders: classify; mask folders: segment; depth maps: "
                                  "depth; COCO JSON or VOC XML boxes: detect; a JSONL/CSV with captions: caption)")
    p.add_argument("--model", help="model name (model.name); default: chosen from the data")
    p.add_argument("--head", help="dense head for segment/depth, or the detector for detect (model.head); "
                                  "default: chosen from the data")
    p.add_argument("--out", help="run directory (engine.out_dir); default: runs/<time>-<model>-<data>")
    p.add_argument("--init", help="weights to start from: file, folder or hub id (model.init)")
    p.add_argument(
        "--resume", nargs="?", const=True, metavar="CKPT",
        help="continue the run in --out; or from CKPT, a checkpoint or run directory. "
             "The run's config.yaml is the base, key=value overrides apply on top",
    )
    p.add_argument("--force", action="store_true",
                   help="--out already holds a run: delete its files (config, checkpoints, metrics...) and start over")
    p.add_argument("--reschedule", action="store_true",
                   help="on --resume, accept overrides that change the lr schedule (epochs, batch size, lr, ...): "
                        "the schedule is re-stretched from the current step")
    p.add_argument("--show-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. engine.epochs=10")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from ..config import load_config
    from ..engine.distributed import init_distributed, shutdown_distributed
    from ..train import train

    base_run, resume, out = resume_plan(args)
    recipe = args.recipe
    if base_run is not None:
        if recipe:
            raise ConfigError(
                f"--recipe cannot be combined with resuming {base_run.path}: a resumed run keeps its config.yaml; "
                "change settings with key=value overrides"
            )
        recipe = str(base_run.config_file)
    flags = {"data": args.data, "model": args.model, "out": out, "init": args.init, "task": args.task,
             "head": args.head}
    overrides = [f"{key}={flags[name]}" for name, key in _FLAG_KEYS if flags[name] is not None]
    cfg = load_config(recipe, overrides + list(args.overrides))
    args.cfg = cfg  # train() fills in the run dir; the CLI puts a bug's traceback there
    if args.show_config:
        if int(os.environ.get("RANK", 0)) == 0:
            print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
            from ..objectives import describe_objectives

            print(describe_objectives())
        return 0
    is_main = init_distributed().is_main
    try:
        summary = train(cfg, resume=resume, force=args.force, reschedule=args.reschedule)
    except BaseException:
        shutdown_distributed(wait=False)
        raise
    shutdown_distributed()
    if is_main:
        print(format_summary(summary, cfg.data.path))
    return 0


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2%}"


def _metrics_line(summary: dict) -> str:
    task = summary.get("task", "classify")
    if task == "segment":
        return f"val mIoU {_pct(summary.get('val_miou'))}, pixel accuracy {_pct(summary.get('val_pixel_acc'))}"
    if task == "detect":
        v = [summary.get(f"val_{k}") for k in ("ap", "ap50", "ap75")]
        return "val " + ", ".join(f"{k} {'n/a' if x is None else f'{x:.3f}'}" for k, x in zip(("AP", "AP50", "AP75"), v))
    if task == "depth":
        v = [summary.get(f"val_{k}") for k in ("absrel", "rmse", "delta1")]
        return "val " + ", ".join(f"{k} {'n/a' if x is None else f'{x:.3f}'}" for k, x in zip(("AbsRel", "RMSE"), v)) + \
            f", delta1 {_pct(v[2])}"
    if task == "caption":
        r = f"val recall (mean of R@1/5/10 both ways) {_pct(summary.get('val_r_mean'))}"
        zs = summary.get("val_zeroshot_acc1")
        return r + (f", zero-shot top-1 {_pct(zs)}" if zs is not None else "")
    if task == "promptable":
        return (f"val point mIoU {_pct(summary.get('val_point_miou'))} (oracle {_pct(summary.get('val_point_miou_oracle'))}),"
                f" box mIoU {_pct(summary.get('val_box_miou'))}")
    if task == "generate":
        cc, fd = summary.get("val_class_consistency"), summary.get("val_fd")
        loss = summary.get("val_loss", summary.get("val_recon_mse"))
        return (f"val loss {'n/a' if loss is None else f'{loss:.4f}'}"
                + (f", class consistency {_pct(cc)}" if cc is not None else "")
                + (f", FD {fd:.2f}" if fd is not None else ""))
    return f"val_acc {_pct(summary.get('val_acc'))}, best_val_acc {_pct(summary.get('best_val_acc'))}"


def _peft_line(peft: dict, run: str) -> str:
    return (f"adapter ({peft['method']}: {peft['n_method']:,} + head {peft['n_head']:,} trained parameters): "
            f"{run}/{peft.get('adapter', 'adapter.safetensors')}, for the base {peft['base_sha256'][:12]}")


def _generate_next(summary: dict, run: str, data: str) -> list[str]:
    """A tokenizer run feeds a generator; a generator run draws samples."""
    from ..generate import generator_kind, list_generators

    model = summary.get("model")
    if model in list_generators() and generator_kind(model) == "tokenizer":
        other = "var" if model.startswith("msvq") else "maskgit"
        return [f"  vitkit train --data {data} objective.name={other} objective.tokenizer={run}"]
    return [f"  vitkit sample {run} --class 0 --n 64"]


def format_summary(summary: dict, data: str) -> str:
    run, data = shlex.quote(summary["out_dir"]), shlex.quote(data)
    return "\n".join([
        f"done ({summary['stopped']}): {_metrics_line(summary)}, {summary['steps']} steps in {summary['wall_s']:.1f} s",
        f"run dir: {run}",
        *[f"kept the weights of step {b['step']}, the best on validation (engine.end_on_best; the last step, "
          f"{b['final_step']}, scored {b['metric']} {b['final_value']:.4g})"
          for b in [summary.get("ended_on_best")] if b and b.get("final_value") is not None],
        *([f"left out {summary['skipped_files']} broken image files, listed in {run}/{BAD_FILES}"]
          if summary.get("skipped_files") else []),
        *([_peft_line(summary["peft"], run)] if summary.get("peft") else []),
        "next:",
        *([f"  vitkit retrieve {run} --data {data}", f"  vitkit zeroshot {run} --data CLASS_FOLDERS"]
          if summary.get("task") == "caption" else
          [f"  vitkit segment {run} IMAGE --point X,Y   (or --box X0,Y0,X1,Y1, or --auto)"]
          if summary.get("task") == "promptable" else
          _generate_next(summary, run, data) if summary.get("task") == "generate" else
          [f"  vitkit eval {run} --data {data}", f"  vitkit predict {run} IMAGE"]),
        f"  vitkit train --resume --reschedule --out {run} engine.epochs=N   (train longer)",
    ])
