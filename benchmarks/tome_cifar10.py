"""Token merging and token pruning on a CIFAR-10 ViT: test accuracy against throughput, plus int8.

A ViT with 64 patch tokens (patch 4 at 32 px, plain patchify, 6 blocks of width 192) is trained
from scratch on the CIFAR-10 JPEG tar under a wall-clock budget (the ``cifar10_fast`` recipe with
that model), or taken from ``--run-dir``. Then, off the shelf (no fine-tuning with ToMe on):

- ToMe with r = 0, 2, 4, ... tokens merged per block (constant schedule, and the decreasing one);
- EViT-style pruning at 1/4, 1/2 and 3/4 of the depth, at several keep rates;
- dynamic int8 quantization of the Linear layers (CPU);

each evaluated for top-1 accuracy on the official test split and for throughput (img/s, median
of timed batches, calls alternating with the unmodified model so that load drifts hit both).
Writes ``results/tome.json`` ({"rows": [{"method", "r_or_keep", "acc", "img_s", "speedup"}], ...})
and ``results/tome.png`` (accuracy against throughput).

    python benchmarks/tome_cifar10.py                                   # 30 min training, all 10k test images
    python benchmarks/tome_cifar10.py --budget 8m --test-images 2000    # the short run committed here
    python benchmarks/tome_cifar10.py --run-dir runs/my-cifar-run       # an already trained model
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vitkit
from vitkit.config import load_config
from vitkit.data import build_dataset, build_loader
from vitkit.efficient import apply_token_pruning, apply_tome, quantize_int8, remove_reduction
from vitkit.models.info import count_flops
from vitkit.predict import load_model
from vitkit.train import train

from _common import RESULTS, machine, versions, write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = next((p / "shared" / "datasets" for p in REPO.parents if (p / "shared" / "datasets").is_dir()),
              REPO.parent / "shared" / "datasets")
MODEL_OVERRIDES = [
    "model.name=vit_nano_convstem_patch4_32", "model.args.conv_stem=false", "model.args.stem_width=null",
]


def train_model(data: str, budget: str, run_dir: str) -> str:
    cfg = load_config("cifar10_fast", [
        f"data.path={data}", *MODEL_OVERRIDES, "engine.tensorboard=false", "engine.plots=false",
        f"engine.out_dir={run_dir}", f"engine.time_budget={budget}",
    ])
    train(cfg)
    return run_dir


def load_test_set(lm, data: str, limit: int | None, img_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split, decoded once: normalised float images (N, C, H, W) and labels (N,).

    ``limit`` takes every k-th image, so that every class is represented as in the full split
    (the split is stored class by class). ``img_size`` resizes (bilinear) for more tokens.
    """
    s = lm.settings
    ds = build_dataset(data, "val", val_fraction=s.get("val_fraction", 0.1), seed=s.get("seed", 0),
                       in_chans=lm.in_chans)
    loader = build_loader(ds, 500, train=False, transform=lm.transform, num_workers=2)
    images, labels = [], []
    for batch in loader:
        images.append(lm.normalize(batch["image"]))
        labels.append(batch["label"])
    x, y = torch.cat(images), torch.cat(labels)
    if limit and limit < len(x):
        idx = torch.linspace(0, len(x) - 1, limit).round().long()
        x, y = x[idx], y[idx]
    if img_size and img_size != x.shape[-1]:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x, y


@torch.inference_mode()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    hits = sum(int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / len(x)


@torch.inference_mode()
def paired_rates(model, base, x: torch.Tensor, reps: int) -> tuple[float, float]:
    """Median img/s of ``model`` and of ``base`` on batch x, timed calls alternating."""
    model(x), base(x)
    rates = {"m": [], "b": []}
    for i in range(reps):
        for key, m in ((("m", model), ("b", base)) if i % 2 == 0 else (("b", base), ("m", model))):
            t0 = time.perf_counter()
            m(x)
            rates[key].append(len(x) / (time.perf_counter() - t0))
    return statistics.median(rates["m"]), statistics.median(rates["b"])


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, marker in (("baseline", "*"), ("tome", "o"), ("tome_decreasing", "s"), ("prune", "^"), ("int8", "D")):
        pts = [r for r in rows if r["method"] == method]
        if not pts:
            continue
        ax.plot([r["img_s"] for r in pts], [100 * r["acc"] for r in pts], marker=marker, label=method,
                linestyle="-" if len(pts) > 1 else "none")
        for r in pts:
            if r["r_or_keep"] is not None:
                ax.annotate(str(r["r_or_keep"]), (r["img_s"], 100 * r["acc"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xlabel("throughput (img/s, CPU)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", help="a trained CIFAR-10 run to evaluate (default: train one)")
    ap.add_argument("--budget", default="30m", help="training wall-clock budget when the script trains")
    ap.add_argument("--data", default=str(SHARED / "cifar10-jpg.tar.gz"))
    ap.add_argument("--test-images", type=int, default=None,
                    help="evaluate on N test images spread evenly over the split (default all)")
    ap.add_argument("--img-size", type=int, default=None,
                    help="evaluate at this input size (upsampled; more tokens for a model trained small)")
    ap.add_argument("--r", default="0,2,4,6,8,10", help="ToMe r values (tokens merged per block)")
    ap.add_argument("--keep", default="0.9,0.8,0.7,0.6,0.5", help="pruning keep rates")
    ap.add_argument("--speed-batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="tome.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    trained_here = args.run_dir is None
    run_dir = args.run_dir or str(REPO / "runs" / f"tome-cifar10-{time.strftime('%Y%m%d-%H%M%S')}")
    if trained_here:
        train_model(args.data, args.budget, run_dir)
    train_s = time.time() - t0
    lm = load_model(run_dir, device="cpu")
    model = lm.model.eval()
    x, y = load_test_set(lm, args.data, args.test_images, args.img_size)
    xb = x[:args.speed_batch]
    grid = model.patch_embed.dynamic_grid(x.shape[2], x.shape[3])
    base_acc = accuracy(model, x, y)
    rows = []

    base_gflops = count_flops(model, x[:1]) / 1e9

    def add(method: str, setting, acc: float, img_s: float, base_img_s: float, net=None) -> None:
        gflops = count_flops(net if net is not None else model, x[:1]) / 1e9
        row = {"method": method, "r_or_keep": setting, "acc": round(acc, 4), "img_s": round(img_s, 1),
               "speedup": round(img_s / base_img_s, 3), "acc_change_points": round(100 * (acc - base_acc), 2),
               "gflops": round(gflops, 4), "flops_speedup": round(base_gflops / gflops, 3)}
        rows.append(row)
        write_json(args.out, payload(complete=False))  # what a cut-off run measured stays on disk
        print(f"{method:16s} {setting!s:>5s}  acc {acc:.4f} ({row['acc_change_points']:+.2f} pt)  "
              f"{img_s:8.1f} img/s  speedup {row['speedup']:.3f}  FLOPs speedup {row['flops_speedup']:.3f}", flush=True)

    def payload(complete: bool) -> dict:
        best = [r for r in rows if r["method"].startswith("tome") and r["acc_change_points"] >= -1.0]
        best = max(best, key=lambda r: r["speedup"], default=None)
        budget_note = f"trained here under a {args.budget} wall-clock budget" if trained_here else f"from {run_dir}"
        n_test = len(x)
        return {
            "complete": complete,  # False: a run still going or cut off (rows so far)
            "benchmark": "ToMe / token pruning / int8 on a CIFAR-10 ViT, off the shelf: test accuracy vs CPU throughput",
            "model": {"name": lm.model.model_name, "args": lm.model.model_args, "tokens": grid[0] * grid[1],
                      "depth": len(model.blocks), "eval_img_size": x.shape[-1]},
            "training": budget_note,
            "train_wall_s": round(train_s, 1) if trained_here else None,
            "test_images": n_test,
            "test_split": f"{n_test} images spread evenly over the official test split" if args.test_images else
                          "the official 10,000-image test split",
            "speed": f"batch {len(xb)}, fp32, median of {args.reps} timed calls alternating with the unmodified model; "
                     "gflops per image counted op by op (flops_speedup does not depend on machine load)",
            "loadavg_end": os.getloadavg(),
            "rows": rows,
            "best_tome_within_1pt": best,
            "int8": next((r for r in rows if r["method"] == "int8"), None),
            "run_dir": run_dir,
            "wall_s": round(time.time() - t0, 1),
            "machine": machine(),
            "versions": versions(vitkit),
        }

    twin = load_model(run_dir, device="cpu").model.eval()  # the unmodified model for paired timing
    m_rate, b_rate = paired_rates(model, twin, xb, args.reps)
    add("baseline", None, base_acc, m_rate, b_rate)
    for schedule, method in (("constant", "tome"), ("decreasing", "tome_decreasing")):
        for r in (int(v) for v in args.r.split(",")):
            if r == 0 and schedule == "decreasing":
                continue
            apply_tome(model, r=r, schedule=schedule)
            acc = accuracy(model, x, y)
            add(method, r, acc, *paired_rates(model, twin, xb, args.reps))
    remove_reduction(model)
    for keep in (float(v) for v in args.keep.split(",")):
        apply_token_pruning(model, keep_rate=keep)
        acc = accuracy(model, x, y)
        add("prune", keep, acc, *paired_rates(model, twin, xb, args.reps))
    remove_reduction(model)
    q = quantize_int8(model)
    add("int8", None, accuracy(q, x, y), *paired_rates(q, twin, xb, args.reps), net=model)

    path = write_json(args.out, payload(complete=True))
    plot(rows, RESULTS / (Path(args.out).stem + ".png"),
         f"{lm.model.model_name} ({grid[0] * grid[1]} tokens at {x.shape[-1]} px), {len(x)} test images")
    print("wrote", path)


if __name__ == "__main__":
    main()
