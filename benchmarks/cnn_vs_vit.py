"""Does a CNN teacher help a ViT student on CIFAR-10? DeiT's distillation under the same optimizer steps.

Runs of the ``cifar10_fast`` recipe (its augmentation, optimizer and one-cycle schedule) at 32 px:

  teachers   ``convnext`` (``convnext_atto``) and ``resnet18``, ``--budget`` of wall-clock each; the
             teacher is the one with the higher test accuracy;
  student    a plain ViT (patch 4: 64 tokens, 6 blocks of width 192) with a class and a distillation
             token, from the same initialisation and in the same data order in every run, for the
             same number of optimizer steps S: the steps the student alone makes in ``--budget``;
             S comes from a short calibration run of the student alone (``--calib``): its
             steps per second of training times the budget less its start-up and evaluation time.
    ``deit_alone``      both heads learn the label;
    ``deit_distilled``  DeiT hard distillation: the distillation head learns the teacher's argmax;
    ``deit_soft``       DeiT soft distillation (alpha 0.5, tau 1, as DeiT's code).
  ``--vit-rows`` adds ``vit`` (the plain ViT) and ``vit_convstem`` (with a convolutional stem) under
  ``--budget``, the CNN-vs-ViT comparison at equal wall-clock.

The student runs share one lr schedule over S steps, so they differ only in the objective; the
distilled runs pay for the teacher's forward passes in wall time, not in steps. The teacher is
picked on the test split (the comparison the study is about); nothing else is tuned on it.
Accuracy is top-1 on the 10,000 test images, with the recipe's flip averaging at evaluation.
``infer_img_s`` is measured after training, on the same device, at batch 256 with the run's
autocast precision.

Writes ``results/<--out>`` (default ``cnn_vs_vit.json``) after every run, as ``{"rows": [{"name",
"acc", "params", "train_img_s", "infer_img_s", "steps", ...}], "distilled_minus_alone": <points>,
"soft_minus_alone": <points>, ...}``, and a bar chart beside it (``.png``). With ``--work DIR`` a
finished run found there (``DIR/<name>.row.json``) is reused, so an interrupted study resumes.

    python benchmarks/cnn_vs_vit.py --work runs/cnn-vs-vit     # 20 min per run: about 1 h 50 min on 2 CPU cores
    python benchmarks/cnn_vs_vit.py --budget 60s --calib 20s --device cuda --workers 12   # a GPU
    python benchmarks/cnn_vs_vit.py --seed 1 --steps 2421 --teachers resnet18 --work runs/cnn-vs-vit-seed1 \
        --out cnn_vs_vit_seed1.json     # a second seed of the whole study, with the first seed's choice of teacher
    python benchmarks/cnn_vs_vit.py --seed 1 --steps 2421 --teacher-run runs/cnn-vs-vit/resnet18 \
        --work runs/cnn-vs-vit-seed1 --out cnn_vs_vit_seed1.json     # the same, reusing the first seed's teacher run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import vitkit
from vitkit.config import load_config
from vitkit.engine.budget import parse_duration
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
    "deit_soft": (VIT, STUDENT),
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


def run(name: str, work: Path, common: list[str], extra: list[str], reuse: bool) -> dict:
    """One training run (a fresh Trainer in this process), or the row of a finished one under ``work``."""
    record = work / f"{name}.row.json"
    if reuse and record.is_file():
        row = json.loads(record.read_text())
        print(f"{name}: reusing {row['run_dir']} (acc {row['acc']:.4f}, {row['steps']} steps)", flush=True)
        return row
    model_name, model_args = MODELS[name.removesuffix("_calib")]
    out = work / name
    cfg = load_config("cifar10_fast", [*common, f"model.name={model_name}", *extra, f"engine.out_dir={out}"])
    cfg.model.args = dict(model_args)  # exactly these: the recipe's model.args belong to the recipe's model
    t0 = time.perf_counter()
    summary = train(cfg, verbose=False, force=True)
    wall = time.perf_counter() - t0
    loaded = load_model(out, device=cfg.engine.device if cfg.engine.device != "auto" else None)
    row = {
        "name": name, "model": model_name, "model_args": dict(model_args), "objective": summary["objective"],
        "acc": summary["val_acc"], "params": sum(p.numel() for p in loaded.model.parameters()),
        "train_img_s": summary["train_img_per_s"], "infer_img_s": infer_img_s(loaded, summary["amp"]),
        "steps": summary["steps"], "epochs": summary["epochs"], "wall_s": wall,
        "train_time_s": summary.get("train_time_s"), "stopped": summary.get("stopped"),
        "overrides": list(extra), "run_dir": str(out),
    }
    record.write_text(json.dumps(row, indent=2) + "\n")
    print(f"{name}: acc {row['acc']:.4f}, {row['steps']} steps ({row['epochs']:.1f} epochs) in {wall:.0f} s, "
          f"train {row['train_img_s']:.0f} img/s, infer {row['infer_img_s']:.0f} img/s", flush=True)
    return row


def steps_in(budget_s: float, calib: dict) -> int:
    """The optimizer steps the student makes in ``budget_s`` of wall-clock: the calibration run's steps per
    second of training, over the budget less what that run spent outside training (start-up, evaluation)."""
    rate = calib["steps"] / calib["train_time_s"]
    return max(1, int(rate * (budget_s - (calib["wall_s"] - calib["train_time_s"]))))


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"vit": "#4c72b0", "vit_convstem": "#64b5cd", "convnext": "#777777", "resnet18": "#999999",
              "deit_alone": "#dd8452", "deit_distilled": "#55a868", "deit_soft": "#8172b2"}
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
    ap.add_argument("--budget", default="20m", help="wall-clock budget of each teacher, and what sets the students' steps")
    ap.add_argument("--calib", default="3m", help="budget of the student's calibration run")
    ap.add_argument("--steps", type=int, default=None, help="the students' steps (skips the calibration)")
    ap.add_argument("--teacher-run", default=None, help="a finished teacher run dir (e.g. the first seed's resnet18): "
                                                        "skips training the two CNNs")
    ap.add_argument("--teachers", default="convnext,resnet18",
                    help="the CNNs to train as teacher candidates (e.g. only the first seed's choice)")
    ap.add_argument("--vit-rows", action="store_true", help="also train the plain ViT and the conv-stem ViT under --budget")
    ap.add_argument("--seed", type=int, default=0, help="engine.seed of every run (initialisation and data order)")
    ap.add_argument("--device", default="auto", help="engine.device: auto, cpu, cuda")
    ap.add_argument("--workers", type=int, default=None, help="data loader workers (default: vitkit's)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    ap.add_argument("--work", default=None, help="folder for the run dirs (default: a new temporary folder); "
                                                 "finished runs found there are reused")
    ap.add_argument("--out", default="cnn_vs_vit.json")
    args = ap.parse_args()
    cnns = () if args.teacher_run else tuple(n.strip() for n in args.teachers.split(",") if n.strip())
    if unknown := [n for n in cnns if n not in ("convnext", "resnet18")]:
        raise SystemExit(f"--teachers: unknown {unknown}; choose from convnext, resnet18")
    budget_s = parse_duration(args.budget)
    reuse = args.work is not None
    work = Path(args.work or tempfile.mkdtemp(prefix="vitkit-cnn-vs-vit-"))
    work.mkdir(parents=True, exist_ok=True)
    common = [f"data.path={args.data}", f"data.batch_size={args.batch_size}", f"engine.device={args.device}",
              f"engine.seed={args.seed}", *QUIET, *args.set]
    if args.workers is not None:
        common.append(f"data.num_workers={args.workers}")
    timed = [f"engine.time_budget={args.budget}"]
    t_all = time.perf_counter()
    load_start = os.getloadavg()
    rows: list[dict] = []
    payload: dict = {}

    def save() -> Path:
        by = {r["name"]: r for r in rows}
        alone = by.get("deit_alone")
        diff = {k: 100 * (by[n]["acc"] - alone["acc"]) if alone and n in by else None
                for k, n in (("distilled_minus_alone", "deit_distilled"), ("soft_minus_alone", "deit_soft"))}
        payload.update({
            "benchmark": "CIFAR-10: a CNN teacher for a ViT student, DeiT hard and soft distillation against the "
                         "student alone at the same optimizer steps",
            "rows": rows,
            **diff,
            "goal": {"rule": "distilled_minus_alone >= +1 point", "met": None if diff["distilled_minus_alone"] is None
                     else diff["distilled_minus_alone"] >= 1.0},
            "units": {"acc": "fraction of the 10k test images", "distilled_minus_alone": "accuracy points",
                      "soft_minus_alone": "accuracy points", "train_img_s": "training images per second (whole run)",
                      "infer_img_s": "forward img/s at batch 256"},
            "budget": args.budget, "seed": args.seed,
            "recipe": "cifar10_fast (bf16 autocast where supported, flip averaging at evaluation); teachers and the "
                      "ViT rows under engine.time_budget, the students under engine.max_steps = student_steps",
            "overrides": common,
            "total_wall_s": time.perf_counter() - t_all,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "machine": machine(),
            "versions": versions(vitkit),
        })
        return write_json(args.out, payload)

    # the student's steps: what it makes alone in the budget
    if args.steps is None:
        calib = run("deit_alone_calib", work, common, [f"engine.time_budget={args.calib}"], reuse)
        steps = steps_in(budget_s, calib)
        payload["calibration"] = {"budget": args.calib, "steps": calib["steps"], "train_time_s": calib["train_time_s"],
                                  "wall_s": calib["wall_s"], "acc": calib["acc"]}
    else:
        steps = args.steps
    payload["student_steps"] = steps
    print(f"student: {steps} optimizer steps in each run", flush=True)
    fixed = ["engine.time_budget=null", f"engine.max_steps={steps}"]

    rows.append(run("deit_alone", work, common, fixed, reuse))
    save()
    for name in (*cnns, *(("vit", "vit_convstem") if args.vit_rows else ())):
        rows.append(run(name, work, common, timed, reuse))
        save()
    if args.teacher_run:
        summary = json.loads((Path(args.teacher_run) / "summary.json").read_text())
        teacher = {"name": Path(args.teacher_run).name, "acc": summary["val_acc"], "wall_s": summary["wall_s"],
                   "run_dir": str(args.teacher_run), "reused": True}
    else:
        teacher = max((r for r in rows if r["name"] in cnns), key=lambda r: r["acc"])
    payload["teacher"] = {k: teacher[k] for k in ("name", "acc", "wall_s")} | {"run_dir": teacher["run_dir"]}
    distill = ["objective.name=deit", f"objective.teacher={teacher['run_dir']}"]
    rows.append(run("deit_distilled", work, common, [*fixed, *distill, "objective.distill_type=hard"], reuse))
    save()
    rows.append(run("deit_soft", work, common, [*fixed, *distill, "objective.distill_type=soft", "objective.alpha=0.5",
                                                "objective.temperature=1.0"], reuse))
    path = save()
    title = (f"CIFAR-10 on {payload['machine']['cuda'] or 'CPU'}: teachers {args.budget} each ({teacher['name']} "
             f"chosen), students {steps} steps\nhard minus alone {payload['distilled_minus_alone']:+.2f}, soft minus "
             f"alone {payload['soft_minus_alone']:+.2f} points")
    chart(rows, path.with_suffix(".png"), title)
    print("wrote", path, f"; hard minus alone {payload['distilled_minus_alone']:+.2f}, soft minus alone "
          f"{payload['soft_minus_alone']:+.2f} points")


if __name__ == "__main__":
    main()
