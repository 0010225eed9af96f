"""Monocular depth on the built-in procedural set (``depth-scenes``: rendered ground, wall, boxes and
spheres with exact metric depth), scored on its held-out images.

The model trains with ``vitkit train --data depth-scenes:N --task depth`` (the CLI a user runs) under
a wall-clock budget, with the depth objective's defaults (MiDaS's scale-and-shift-invariant loss on
disparity). The held-out images are the set's val stream (never seen in training). Scores are
computed here in numpy, independently of vitkit's evaluator, with MiDaS's protocol for a relative
model: per image, the predicted disparity is aligned to the true disparity by least-squares scale
and shift over the valid pixels, turned back into depth (capped at the scene's far limit), and
compared with the true depth: AbsRel, RMSE (metres) and delta1 (share of pixels within 1.25x).

    python benchmarks/depth_synthetic.py                        # 10 min budget
    python benchmarks/depth_synthetic.py --budget 60s --out depth_smoke.json

Writes ``benchmarks/results/depth.json`` ``{"absrel", "rmse", "delta1", "wall_s", ...}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from _common import cli_train, machine, versions, write_json

REPO = Path(__file__).resolve().parents[1]


def align_disparity(pred_disp: np.ndarray, gt_depth: np.ndarray, far: float) -> np.ndarray:
    """Depth from ``pred_disp`` after least-squares scale and shift onto the true disparity."""
    valid = gt_depth > 0
    a = np.stack([pred_disp[valid], np.ones(valid.sum())], 1)
    s, t = np.linalg.lstsq(a, 1.0 / gt_depth[valid], rcond=None)[0]
    disp = np.maximum(s * pred_disp + t, 1.0 / far)
    return 1.0 / disp


def depth_scores(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    valid = gt > 0
    p, g = pred[valid], gt[valid]
    absrel = float(np.mean(np.abs(p - g) / g))
    rmse = float(np.sqrt(np.mean((p - g) ** 2)))
    delta1 = float(np.mean(np.maximum(p / g, g / p) < 1.25))
    return absrel, rmse, delta1


@torch.no_grad()
def evaluate(run: Path, n_val: int, seed: int, img_size: int) -> dict:
    from vitkit.data.depth_scenes import MAX_DEPTH, DepthScenesDataset
    from vitkit.source import load_model

    loaded = load_model(str(run))
    loaded.model.eval()
    ds = DepthScenesDataset(n_val, split="val", seed=seed, img_size=img_size)
    rows = []
    for i in range(len(ds)):
        img, target, _ = ds.load(i)
        x = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)[None]
        out = loaded.dense(x)[0, 0].cpu().numpy().astype(np.float64)
        gt = target["depth"].astype(np.float64)
        rows.append(depth_scores(align_disparity(out, gt, MAX_DEPTH), gt))
    absrel, rmse, delta1 = (float(np.mean(c)) for c in zip(*rows))
    return {"absrel": absrel, "rmse": rmse, "delta1": delta1, "n_images": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="10m")
    ap.add_argument("--n-train", type=int, default=4000, help="training images of the procedural set")
    ap.add_argument("--n-val", type=int, default=200, help="held-out images scored")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides (model, head, ...)")
    ap.add_argument("--run-root", default=None)
    ap.add_argument("--out", default="depth.json")
    args = ap.parse_args()
    from vitkit.engine.budget import parse_duration

    run = Path(args.run_root or REPO / "runs" / f"depth-synthetic-{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.time()
    tr = cli_train(f"depth-scenes:{args.n_train}", run,
                   ["--task", "depth", f"engine.time_budget={args.budget}", *args.set])
    summary, run_info, train_s = tr["summary"], tr["run_info"], tr["wall_s"]
    scores = evaluate(run, args.n_val, seed=0, img_size=args.img_size)
    result = {
        "benchmark": "depth_synthetic", **scores, "wall_s": time.time() - t0, "train_wall_s": train_s,
        "budget_s": parse_duration(args.budget), "n_train": args.n_train, "img_size": args.img_size,
        "protocol": "per-image least-squares scale+shift on disparity (MiDaS), depth capped at the set's far limit",
        "model": run_info.get("model"), "head": run_info.get("head"), "objective": run_info.get("objective"),
        "steps": summary.get("steps"), "epochs": summary.get("epochs"),
        "train_img_s": summary.get("train_img_per_s"), "command": tr["command"], "run_dir": str(run),
        "machine": machine(), "versions": versions(),
    }
    path = write_json(args.out, result)
    print(f"absrel {scores['absrel']:.4f}  rmse {scores['rmse']:.3f} m  delta1 {scores['delta1']:.4f}; wrote {path}")


if __name__ == "__main__":
    main()
