"""CLIP vs SigLIP from scratch on the captioned shapes, same wall-clock budget each.

Each row trains with ``vitkit train --data shapes-captions:N`` (the CLI a user runs) with only the
model (``clip_nano`` / ``siglip_nano``: their kind picks the objective) and the time budget set; the
plan fills in the rest. Then, on the run's validation images (never trained on):

- zero-shot top-1 over the six shape names with prompt templates unlike every training caption
  (the captions never say "photo", "picture" or "image"; see ``TEMPLATES``);
- retrieval recall@1/5 both ways (every caption of an image is a query), ``r1``/``r5`` their means.

Both are computed by :func:`vitkit.evaluate_caption.zeroshot` / ``retrieve`` from the final
weights file, as ``vitkit zeroshot`` and ``vitkit retrieve`` do. The time per training step comes
from the run's own logs. Rows are merged into ``benchmarks/results/clip.json`` under ``"shapes"``.

    python benchmarks/clip_shapes.py                      # 15 min each (the issue's budget)
    python benchmarks/clip_shapes.py --budget 30s --n 512 --smoke   # a one-minute smoke of the pipeline
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import RESULTS, cli_train, machine, versions

OUT = "clip.json"
MODELS = {"clip": "clip_nano", "siglip": "siglip_nano"}
# Zero-shot prompts: none of the words the shapes captions are made of besides the class name.
TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.")


def step_seconds(summary: dict) -> float | None:
    """Seconds per optimizer step of the run: its training time over its steps (evaluations excluded)."""
    steps = summary.get("steps") or 0
    return summary["train_time_s"] / steps if steps and summary.get("train_time_s") else None


def merge_results(section: str, rows: dict, extra: dict) -> Path:
    """Merge ``rows`` into ``results/clip.json[section]`` (a rerun replaces its rows only)."""
    path = RESULTS / OUT
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault(section, {}).update(rows)
    data.setdefault("meta", {})[section] = extra
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def run_row(kind: str, data: str, budget: str, out: Path, extra_args: list[str]) -> dict:
    from vitkit.evaluate_caption import retrieve, zeroshot

    trained = cli_train(data, out, [f"model.name={MODELS[kind]}", f"engine.time_budget={budget}", *extra_args])
    zs = zeroshot(str(out), data, templates=list(TEMPLATES), split="val")
    rt = retrieve(str(out), data, ks=(1, 5), split="val")
    row = {
        "zeroshot": zs["top1"], "zeroshot_top5": zs["top5"],
        "r1": (rt["i2t_r1"] + rt["t2i_r1"]) / 2, "r5": (rt["i2t_r5"] + rt["t2i_r5"]) / 2,
        **{k: rt[k] for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")},
        "chance": {"zeroshot": zs["chance_top1"], **rt["chance"]},
        "wall_s": trained["wall_s"], "steps": trained["summary"].get("steps"),
        "step_s": step_seconds(trained["summary"]), "model": MODELS[kind],
        "objective": trained["run_info"]["objective"]["name"], "n_val_images": zs["n"],
        "budget": budget, "command": trained["command"], "per_class": zs["per_class"],
    }
    print(f"{kind}: zero-shot {row['zeroshot']:.1%}, R@1 {row['r1']:.1%}, R@5 {row['r5']:.1%}, "
          f"{row['steps']} steps, {row['step_s'] or float('nan'):.3f} s/step, {row['wall_s']:.0f} s")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="15m", help="training time per model (engine.time_budget)")
    p.add_argument("--n", type=int, default=10000, help="training images (shapes-captions:N)")
    p.add_argument("--models", default="clip,siglip")
    p.add_argument("--out", help="where the runs go (default: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="do not write results/clip.json")
    p.add_argument("overrides", nargs="*", help="extra key=value for vitkit train")
    args = p.parse_args()
    import torch

    import vitkit

    root = Path(args.out or tempfile.mkdtemp(prefix="clip_shapes_"))
    data = f"shapes-captions:{args.n}"
    rows = {kind: run_row(kind, data, args.budget, root / kind, list(args.overrides))
            for kind in args.models.split(",")}
    extra = {"machine": machine(), "versions": versions(vitkit), "data": data, "budget": args.budget,
             "templates": list(TEMPLATES), "torch_threads": torch.get_num_threads()}
    if args.smoke:
        print(json.dumps({"shapes": rows}, indent=2)[:2000])
        return
    print(f"wrote {merge_results('shapes', rows, extra)}")


if __name__ == "__main__":
    main()
