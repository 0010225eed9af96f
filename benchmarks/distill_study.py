"""Does a teacher help a data-hungry ViT? The same student alone vs distilled, under the same step budget.

1. Train the teacher (a conv-stem model from the registry by default; any registered name,
   e.g. a CNN, via ``--teacher``) on the training split.
2. Train the student (a plain ViT with a distillation token) three times from the same
   initialisation, the same data order and the same number of optimizer steps:
   ``supervised`` (alone: both heads learn the label), ``kd`` (Hinton) and ``deit`` (hard
   distillation through the distillation token), the last two from the teacher's run dir.

Accuracy is on the test split (Fashion-MNIST's ``t10k`` files, CIFAR-10's ``test/``), evaluated
once at the end of each run; nothing is tuned on it. Every run uses the ``cifar10_fast``
recipe with its time budget replaced by ``engine.max_steps``. Wall times are of whole runs
(data, training, evaluation); the distilled runs pay for the teacher's forward passes.

Writes ``results/<--out>`` (default ``distill.json``): the teacher's and each student's
accuracy, ``distilled_minus_alone`` in points per objective, steps, wall times, machine and
versions, and a bar chart beside it (``.png``).

    python benchmarks/distill_study.py                       # the full study (hours on 2 CPU cores)
    OMP_NUM_THREADS=1 python benchmarks/distill_study.py --teacher-steps 60 --steps 40 --batch-size 32 \\
        --student-args depth=2 --subset 6000,1000            # the short run committed here (a loaded machine)
    python benchmarks/distill_study.py --teacher-run RUN     # students only, from a teacher trained before
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml

import vitkit
from vitkit.config import load_config
from vitkit.train import train

from _common import RESULTS, machine, versions, write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = next((p / "shared" / "datasets" for p in REPO.parents if (p / "shared" / "datasets").is_dir()),
              REPO.parent / "shared" / "datasets")
QUIET = ["engine.tensorboard=false", "engine.plots=false", "engine.time_budget=null", "engine.epochs=1000",
         "engine.eval_every=1000"]


def _model_args(spec: str) -> dict:
    """``"patch_size=4,depth=6"`` -> ``{"patch_size": 4, "depth": 6}`` (values parsed as YAML)."""
    pairs = (kv.split("=", 1) for kv in spec.split(",") if kv.strip())
    return {k.strip(): yaml.safe_load(v) for k, v in pairs}


def idx_subset(path: str, n_train: int, n_test: int, out: Path) -> str:
    """The first ``n_train`` / ``n_test`` samples of an IDX dataset (MNIST layout), written under ``out``."""
    from vitkit.data.arrays import find_idx, read_idx

    files = find_idx(path)
    if files is None:
        raise SystemExit(f"--subset works on IDX folders (MNIST layout); {path} is not one")
    out.mkdir(parents=True, exist_ok=True)
    for key, src in files.items():
        arr = read_idx(src)[: n_train if key.startswith("train") else n_test]
        name = Path(src).name.removesuffix(".gz")
        header = b"\x00\x00\x08" + bytes([arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
        (out / name).write_bytes(header + arr.tobytes())
    return str(out)


def run(name: str, work: Path, common: list[str], overrides: list[str], model_args: dict) -> dict:
    out = work / name
    steps = next(int(o.split("=")[1]) for o in overrides if o.startswith("engine.max_steps="))
    # Warm up over the first tenth of the run, whatever its length (the recipe's is in epochs).
    warmup = [f"schedule.warmup_steps={max(1, steps // 10)}"]
    cfg = load_config("cifar10_fast", [*common, *warmup, *overrides, f"engine.out_dir={out}"])
    cfg.model.args = model_args  # exactly these: the recipe's model.args are the recipe model's
    t0 = time.perf_counter()
    summary = train(cfg, verbose=False, force=True)
    wall = time.perf_counter() - t0
    row = {
        "name": name, "model": summary["model"], "objective": summary["objective"], "acc": summary["val_acc"],
        "steps": summary["steps"], "epochs": summary["epochs"], "wall_s": wall,
        "train_img_per_s": summary["train_img_per_s"], "run_dir": str(out),
    }
    print(f"{name}: acc {row['acc']:.4f} after {row['steps']} steps in {wall:.0f} s", flush=True)
    return row


def chart(rows: list[dict], teacher: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [teacher["name"], *(r["name"] for r in rows)]
    accs = [100 * teacher["acc"], *(100 * r["acc"] for r in rows)]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    bars = ax.bar(names, accs, color=["#777777", "#4c72b0", "#dd8452", "#55a868"][: len(names)])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("test accuracy (%)")
    low = min(accs)
    ax.set_ylim(max(0.0, low - 10), min(100.0, max(accs) + 5))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "fashion-mnist"), help="dataset path (IDX folder, CIFAR-10 tar, ...)")
    ap.add_argument("--teacher", default="vit_nano_convstem_patch8_64", help="registered teacher model")
    ap.add_argument("--teacher-args", default="stem_width=192", help="teacher model.args, comma-separated k=v")
    ap.add_argument("--teacher-steps", type=int, default=3000)
    ap.add_argument("--teacher-run", default=None, help="reuse this finished teacher run dir instead of training one")
    ap.add_argument("--student", default="deit_tiny_distilled_patch16_224",
                    help="registered student with a distillation token")
    ap.add_argument("--student-args", default="", help="extra student model.args, comma-separated k=v")
    ap.add_argument("--patch-size", type=int, default=4, help="the student's patch size at --img-size")
    ap.add_argument("--steps", type=int, default=3000, help="optimizer steps of each student run")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--objectives", nargs="*", default=["kd", "deit"], choices=["kd", "deit"])
    ap.add_argument("--subset", default=None, help="short runs on IDX data: N_TRAIN,N_TEST first samples")
    ap.add_argument("--work", default=None, help="folder for the run dirs (default: a new temporary folder)")
    ap.add_argument("--out", default="distill.json")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="vitkit-distill-"))
    data = args.data
    if args.subset:
        n_train, n_test = (int(v) for v in args.subset.split(","))
        data = idx_subset(args.data, n_train, n_test, work / f"{Path(args.data).name}-subset")
    common = [f"data.path={data}", f"data.img_size={args.img_size}", f"data.batch_size={args.batch_size}",
              *QUIET]
    load_start = os.getloadavg()
    t_all = time.perf_counter()

    if args.teacher_run:  # a teacher trained before (by this script or by hand): its summary stands in
        summary = json.loads((Path(args.teacher_run) / "summary.json").read_text())
        teacher = {"name": "teacher", "model": summary["model"], "objective": summary["objective"],
                   "acc": summary["val_acc"], "steps": summary["steps"], "epochs": summary["epochs"],
                   "wall_s": summary["wall_s"], "train_img_per_s": summary["train_img_per_s"],
                   "run_dir": args.teacher_run, "reused": True}
    else:
        teacher = run("teacher", work, common, [f"model.name={args.teacher}", f"engine.max_steps={args.teacher_steps}"],
                      _model_args(args.teacher_args))
    student = [f"model.name={args.student}", f"engine.max_steps={args.steps}"]
    student_args = _model_args(f"patch_size={args.patch_size},{args.student_args}")
    alone = run("alone", work, common, [*student, "objective.name=supervised"], student_args)
    rows = [alone]
    extra = {"kd": [], "deit": ["objective.distill_type=hard"]}
    for name in args.objectives:
        rows.append(run(name, work, common, [*student, f"objective.name={name}",
                                             f"objective.teacher={teacher['run_dir']}", *extra[name]], student_args))
    diff = {r["name"]: 100 * (r["acc"] - alone["acc"]) for r in rows[1:]}
    cfg = yaml.safe_load((work / "alone" / "config.yaml").read_text())
    payload = {
        "benchmark": "the same student alone vs distilled from a trained teacher, same optimizer steps",
        "data": args.data,
        "subset": args.subset,
        "teacher": teacher,
        "rows": rows,
        "distilled_minus_alone": diff,
        "units": {"acc": "fraction of the test split", "distilled_minus_alone": "accuracy points"},
        "steps": {"teacher": teacher["steps"], "student": args.steps},
        "student_model_args": cfg["model"]["args"],
        "recipe": "cifar10_fast with engine.max_steps instead of its time budget",
        "short_run": args.steps < 3000 or teacher["steps"] < 3000 or bool(args.subset),
        "total_wall_s": time.perf_counter() - t_all,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "machine": machine(),
        "versions": versions(vitkit),
    }
    path = write_json(args.out, payload)
    budget = f"{args.steps} steps" + (f", subset {args.subset}" if args.subset else "") + \
        (" (SHORT run)" if payload["short_run"] else "")
    title = (f"{Path(args.data).name}: {args.student} alone vs distilled, {budget}\n"
             f"teacher {teacher['model']} ({teacher['steps']} steps)")
    chart(rows, teacher, RESULTS / Path(args.out).with_suffix(".png").name, title)
    print("wrote", path, "; distilled minus alone (points):", {k: round(v, 2) for k, v in diff.items()})


if __name__ == "__main__":
    main()
