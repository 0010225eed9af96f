"""Does attention rollout find the object? Train on the built-in shapes with `vitkit train`, then
measure how much of each validation image's rollout mass falls inside the shape's mask.

A map that ignored the image would put mass on the shape in proportion to its area, so the
claim is ``mass_inside`` well above ``area_fraction``. The mask is averaged over each patch (the
map's resolution); both numbers are means over ``n`` validation images of the run's own
validation split. Gradient rollout (for the true class) and last-layer attention are reported
beside it.

    python benchmarks/explain_shapes.py                   # the recipe's full 5-epoch run, 100 images
    python benchmarks/explain_shapes.py --epochs 2        # shorter (the budget is in the JSON)
    python benchmarks/explain_shapes.py --time-budget 4m  # as much training as 4 minutes allow
    python benchmarks/explain_shapes.py --run-dir runs/x  # keep the run there (or measure the run already there)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import vitkit
from vitkit.data import ShapesDataset
from vitkit.interpret import (
    capture_attention,
    gradient_rollout,
    head_maps,
    readout_rows,
    rollout_map,
    token_map,
)
from vitkit.predict import load_model

from _common import machine, versions, write_json


def train(run_dir: Path, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "vitkit.cli.main", "train", "--data", "shapes", "--out", str(run_dir), *overrides]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def mask_coverage(lm, mask, grid) -> torch.Tensor:
    """The fraction of each patch covered by the shape, after the model's own resize and crop."""
    as_seen = lm.transform(Image.fromarray(mask.astype("uint8") * 255, "L"))[0].float() / 255  # (H, W)
    return F.adaptive_avg_pool2d(as_seen[None, None], grid)[0, 0]


def measure(run_dir: Path, n: int, batch: int = 25) -> dict:
    lm = load_model(run_dir, device="cpu")
    model = lm.model
    seed = lm.settings.get("seed", 0)
    val = ShapesDataset(n=max(n, 100), split="val", seed=seed, img_size=64)
    inside = {"rollout": [], "grad_rollout": [], "last_layer": []}
    area, correct = [], 0
    for start in range(0, n, batch):
        samples = [val.sample(i) for i in range(start, min(n, start + batch))]
        pixels = torch.stack([lm.transform(s["image"]) for s in samples])
        x = lm.normalize(pixels)
        labels = torch.tensor([s["label"] for s in samples])
        heat, maps = rollout_map(model, x)
        grid = maps.grid
        cover = torch.stack([mask_coverage(lm, s["mask"], grid) for s in samples])  # (B, H', W')
        R, logits = gradient_rollout(model, x, target=labels)
        grad_heat = token_map(R, maps.num_prefix_tokens, grid, readout_rows(model))
        last = capture_attention(model, x, layers=[-1], average_heads=True)
        last_heat = head_maps(last[0], maps.num_prefix_tokens, grid, readout_rows(model))[:, 0]
        for key, h in (("rollout", heat), ("grad_rollout", grad_heat), ("last_layer", last_heat)):
            inside[key] += (h * cover).sum((1, 2)).tolist()
        area += cover.mean((1, 2)).tolist()
        correct += int((logits.argmax(-1) == labels).sum())
    mean = lambda v: round(sum(v) / len(v), 4)  # noqa: E731
    return {
        "mass_inside": mean(inside["rollout"]),
        "area_fraction": mean(area),
        "n": n,
        "ratio": round(mean(inside["rollout"]) / mean(area), 3),
        "grad_rollout_mass_inside": mean(inside["grad_rollout"]),
        "last_layer_attention_mass_inside": mean(inside["last_layer"]),
        "images_inside_above_area": sum(i > a for i, a in zip(inside["rollout"], area)),
        "val_acc_on_these": round(correct / n, 4),
        "model": type(model).__name__ + " " + getattr(model, "model_name", ""),
        "readout": "class token" if readout_rows(model) else "mean of patch tokens (the model pools by averaging)",
        "grid": list(grid),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=None, help="engine.epochs for the run (default: the recipe's)")
    ap.add_argument("--time-budget", help="engine.time_budget for the run, e.g. 4m (a shorter run on a busy machine)")
    ap.add_argument("--n", type=int, default=100, help="validation images to measure")
    ap.add_argument("--run-dir", help="train into this folder and keep it; if it already holds a run, measure that")
    ap.add_argument("--out", default="explain_shapes.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="vitkit-explain-shapes-")) / "run"
    existing = (run_dir / "run.json").is_file()
    overrides = [f"engine.epochs={args.epochs}"] * (args.epochs is not None)
    overrides += [f"engine.time_budget={args.time_budget}"] * (args.time_budget is not None)
    wall = None if existing else train(run_dir, overrides)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    result = measure(run_dir, args.n)
    payload = {
        "benchmark": "attention rollout mass inside the shape mask vs the mask's area, shapes validation images",
        **result,
        "train": {
            "command": " ".join(["vitkit train --data shapes", *overrides]) if not existing else None,
            "epochs": summary.get("epochs"),
            "steps": summary.get("steps"),
            "val_acc": summary.get("val_acc"),
            "wall_s": None if wall is None else round(wall, 1),
            "budget": "existing run" if existing else
                      f"short: {' '.join(overrides)}" if overrides else "full (recipe default)",
        },
        "machine": machine(),
        "versions": versions(vitkit),
    }
    print(json.dumps({k: payload[k] for k in ("mass_inside", "area_fraction", "n", "ratio")}))
    print("wrote", write_json(args.out, payload))
    if not args.run_dir:
        shutil.rmtree(run_dir.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
