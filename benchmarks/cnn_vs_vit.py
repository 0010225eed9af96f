"""CNNs against ViTs on CIFAR-10 under the same wall-clock budget, and what a CNN teacher gives a ViT.

Six runs of the ``cifar10_fast`` recipe (its augmentation, optimizer and one-cycle schedule),
each with the same ``engine.time_budget`` for the whole run, at 32 px:

  (a) ``vit``          a plain ViT: patch 4 (64 tokens), 6 blocks of width 192, average pooling;
  (b) ``vit_convstem`` the same ViT with a convolutional stem instead of the patchify layer;
  (c) ``convnext``     ``convnext_atto``;
  (d) ``resnet18``     ``resnet18``;
  (f) ``deit_alone``   the student: ViT (a) with a class and a distillation token, trained alone
                       (both heads learn the label);
  (e) ``deit_distilled`` the same student, same initialisation and data order, trained with
                       hard distillation through its distillation token (DeiT), the teacher
                       being the better of (c) and (d). The teacher's own run is (c) or (d): its
                       time is reported there, not added to the student's budget.

The teacher is the CNN with the higher test accuracy (the comparison the study is about), so
the study does use the test split to pick it; nothing else is tuned on it. Accuracy is top-1 on
the 10,000 test images, with the recipe's flip averaging at evaluation. ``infer_img_s`` is
measured after training, on the same device, at batch 256 with the run's autocast precision.

Writes ``results/<--out>`` (default ``cnn_vs_vit.json``; an absolute path goes there) after every run, as
``{"rows": [{"name", "acc", "params", "train_img_s", "infer_img_s", ...}],
"distilled_minus_alone": <points>, ...}``, and a bar chart beside it (``.png``).

    python benchmarks/cnn_vs_vit.py                          # 10 min per model (an hour on 2 CPU cores)
    python benchmarks/cnn_vs_vit.py --budget 60s --device cuda --workers 12   # a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import vitkit
from vitkit.config import load_config
from vitkit.predict import load_model
from vitkit.train import train

from _common import machine, versions, write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = next((p / "shared" / "datasets" for p in REPO.parents if (p / "shared" / "datasets").is_dir()),
              REPO.parent / "shared" / "datasets")
QUIET = ["engine.tensorboard=false", "engine.plots=false", "engine.eval_every=1000", "engine.epochs=1000"]

VIT = "vit_nano_convstem_patch4_32"  # width 192, depth 6, 3 heads, MLP ratio 3, patch 4 at 32 px
STUDENT = {"conv_stem": False, "distilled": True, "global_pool": "token"}
MODELS = {
    "vit": (VIT, {"conv_stem": False}),
    "vit_convstem": (VIT, {"conv_stem": True}),
    "convnext": ("convnext_atto", {}),
    "resnet18": ("resnet18", {}),
    "deit_alone": (VIT, STUDENT),
    "deit_distilled": (VIT, STUDENT),
}


def infer_img_s(loaded, amp: str, batch: int = 256, reps: int = 10) -> float:
    """Median img/s of a loaded model's forward pass (eval mode, no grad, the run's autocast)."""
    model, dev = loaded.model, loaded.device
    h, w = loaded.transform.size
    x = torch.randn(batch, 3, h, w, device=dev)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(amp)
    times = []
    with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for i in range(reps + 3):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:  # warm-up
                times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def run(name: str, work: Path, common: list[str], extra: list[str] | None = None) -> dict:
    model_name, model_args = MODELS[name]
    out = work / name
    cfg = load_config("cifar10_fast", [*common, f"model.name={model_name}", *(extra or []), f"engine.out_dir={out}"])
    cfg.model.args = dict(model_args)  # exactly these: the recipe's model.args belong to the recipe's model
    t0 = time.perf_counter()
    summary = train(cfg, verbose=False, force=True)
    wall = time.perf_counter() - t0
    loaded = load_model(out, device=cfg.engine.device if cfg.engine.device != "auto" else None)
    row = {
        "name": name, "model": model_name, "model_args": dict(model_args), "objective": summary["objective"],
        "acc": summary["val_acc"], "params": sum(p.numel() for p in loaded.model.parameters()),
        "train_img_s": summary["train_img_per_s"], "infer_img_s": infer_img_s(loaded, summary["amp"]),
        "steps": summary["steps"], "epochs": summary["epochs"], "wall_s": wall, "run_dir": str(out),
    }
    print(f"{name}: acc {row['acc']:.4f}, {row['epochs']:.1f} epochs in {wall:.0f} s, "
          f"train {row['train_img_s']:.0f} img/s, infer {row['infer_img_s']:.0f} img/s", flush=True)
    return row


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"vit": "#4c72b0", "vit_convstem": "#64b5cd", "convnext": "#777777", "resnet18": "#999999",
              "deit_alone": "#dd8452", "deit_distilled": "#55a868"}
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    bars = ax.bar([r["name"] for r in rows], [100 * r["acc"] for r in rows],
                  color=[colors.get(r["name"], "#333333") for r in rows])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("test accuracy (%)")
    accs = [100 * r["acc"] for r in rows]
    ax.set_ylim(max(0.0, min(accs) - 15), min(100.0, max(accs) + 6))
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "cifar10-jpg.tar.gz"))
    ap.add_argument("--budget", default="10m", help="wall-clock budget of each run (10m, 90s)")
    ap.add_argument("--device", default="auto", help="engine.device: auto, cpu, cuda")
    ap.add_argument("--workers", type=int, default=None, help="data loader workers (default: vitkit's)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    ap.add_argument("--work", default=None, help="folder for the run dirs (default: a new temporary folder)")
    ap.add_argument("--out", default="cnn_vs_vit.json")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="vitkit-cnn-vs-vit-"))
    common = [f"data.path={args.data}", f"data.batch_size={args.batch_size}", f"engine.time_budget={args.budget}",
              f"engine.device={args.device}", *QUIET, *args.set]
    if args.workers is not None:
        common.append(f"data.num_workers={args.workers}")
    t_all = time.perf_counter()
    load_start = os.getloadavg()
    rows: list[dict] = []
    payload: dict = {}

    def save(diff: float | None) -> Path:
        payload.update({
            "benchmark": "CIFAR-10, the same wall-clock budget per model; a CNN teacher for a ViT student",
            "rows": rows,
            "distilled_minus_alone": diff,
            "units": {"acc": "fraction of the 10k test images", "distilled_minus_alone": "accuracy points",
                      "train_img_s": "training images per second (whole run)",
                      "infer_img_s": "forward img/s at batch 256"},
            "budget_per_model": args.budget,
            "recipe": "cifar10_fast (bf16 autocast, flip averaging at evaluation), engine.time_budget per run",
            "overrides": common,
            "total_wall_s": time.perf_counter() - t_all,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "machine": machine(),
            "versions": versions(vitkit),
        })
        return write_json(args.out, payload)

    for name in ("vit", "vit_convstem", "convnext", "resnet18", "deit_alone"):
        rows.append(run(name, work, common))
        save(None)
    teacher = max((r for r in rows if r["name"] in ("convnext", "resnet18")), key=lambda r: r["acc"])
    payload["teacher"] = {"name": teacher["name"], "acc": teacher["acc"], "wall_s": teacher["wall_s"]}
    rows.append(run("deit_distilled", work, common, ["objective.name=deit", "objective.distill_type=hard",
                                                      f"objective.teacher={teacher['run_dir']}"]))
    diff = 100 * (rows[-1]["acc"] - rows[-2]["acc"])
    path = save(diff)
    title = (f"CIFAR-10, {args.budget} per model on {payload['machine']['cuda'] or 'CPU'}; "
             f"teacher: {teacher['name']}\ndistilled minus alone: {diff:+.2f} points")
    chart(rows, path.with_suffix(".png"), title)
    print("wrote", path, f"; distilled minus alone: {diff:+.2f} points")


if __name__ == "__main__":
    main()
