"""Class-conditional image generation on Fashion-MNIST (28x28): a VQ tokenizer, then MaskGIT, VAR and DiT
under the same wall-clock budget each, judged by a classifier vitkit trains itself.

No Inception network is reachable offline, so the samples are scored in the feature space of a
Fashion-MNIST classifier trained here (its pooled pre-logits, :class:`vitkit.objectives.judge.Judge`).
Every training stage is a fresh ``vitkit train`` process, as a user runs it (``vitkit`` reads the IDX
files directly; their val split is the 10,000-image test set):

0. the judge: ``vitkit train --data FASHION engine.time_budget=JUDGE_BUDGET`` (the plan picks the model
   and its resolution); its test accuracy is the ceiling of class consistency;
1. the tokenizers: ``objective.name=vqvae`` (``vq_nano``, single-scale, for MaskGIT) and
   ``objective.name=vqvae model.name=msvq_nano`` (the multi-scale residual quantiser VAR predicts),
   TOKENIZER_BUDGET each;
2. the generators: ``objective.name=maskgit objective.tokenizer=VQ``, ``objective.name=var
   objective.tokenizer=MSVQ`` and ``objective.name=dit`` (on pixels), BUDGET each, every other key at
   vitkit's defaults (``--set`` adds overrides to all three).

Then, in this process, per generator: N class-balanced samples (N/10 of each class) at the guidance
and decoding steps its run recorded (``meta.models``) or, with ``--guidance-sweep``, at the guidance of
that list with the highest class consistency on ``--n-guidance`` separately seeded samples, and

- ``class_consistency``: the judge's accuracy on the samples (the class each was generated for);
- ``fd``: the Frechet distance between the judge's features of the samples and of N real test images
  (class-balanced, drawn with the seed); ``fd_real_floor``: the same distance between those real
  images and a disjoint N-image class-balanced test subset (equal N on both sides), i.e. what two
  real sets of this size score;
- ``sample_s_per_image``: wall seconds to draw the N samples (tokenizer decoding included, batches of
  ``--batch``) divided by N; ``params``: the generator's parameters (the tokenizer's are in ``meta``);
  ``wall_s``: the training process's wall seconds.

``tokenizer`` (the single-scale one; the multi-scale one in ``meta.tokenizers``): ``recon_mse``, the
mean squared error of ``decode(encode(x))`` on the N real test images in [-1, 1] pixel units;
``codebook_usage``, the share of codebook entries those images use; ``wall_s``, its training process.
``meta.steps_sweep``: sampling seconds per image and class consistency against the number of decoding
steps (MaskGIT 4/8/16, DiT 8/16/32 Euler/Heun steps as the run samples; VAR's steps are its scales).
Grids: ``results/generate_<model>.png``, one row per class.

    python benchmarks/generate_fashion.py                       # ~1 h 40 min on 2 cores
    python benchmarks/generate_fashion.py --run-root runs/gen   # reuses the finished stages there
    python benchmarks/generate_fashion.py --run-root runs/gen --guidance-sweep 1,1.5,2,3,4,6
        # each generator's guidance chosen by class consistency on separately seeded samples (meta.models.*.guidance_sweep)
    python benchmarks/generate_fashion.py --smoke               # the whole pipeline in ~2 min, to /tmp

Writes ``benchmarks/results/generate.json`` and ``generate_<model>.png``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import time
from pathlib import Path

import numpy as np
import torch

from _common import RESULTS, cli_train, machine, versions, write_json

REPO = Path(__file__).resolve().parents[1]
# ../shared/datasets beside the checkout (or beside a worktree's parent folder)
SHARED = next((p / "shared" / "datasets" for p in REPO.parents if (p / "shared" / "datasets").is_dir()),
              REPO.parent / "shared" / "datasets")
FASHION = SHARED / "fashion-mnist"
QUIET = ["engine.tensorboard=false", "engine.plots=false"]
KINDS = ("maskgit", "var", "dit")
TOKENIZER_OF = {"maskgit": "vq", "var": "msvq", "dit": None}
SWEEP = {"maskgit": (4, 8, 16), "dit": (8, 16, 32)}
GOAL_CC, GOAL_FD_RATIO, DONE_CC = 0.90, 3.0, 0.85

# --smoke: the _test variants, a few steps each, a 300-image subset of the data
SMOKE_MODELS = {"judge": ["model.name=test_vit", "data.img_size=32", "model.args.embed_dim=16"],
                "vq": ["model.name=vq_test"], "msvq": ["model.name=msvq_test"],
                "maskgit": ["model.name=maskgit_test", "objective.sample_steps=4"], "var": ["model.name=var_test"],
                "dit": ["model.name=dit_test", "objective.sample_steps=4"]}
SMOKE_ENGINE = ["engine.max_steps=3", "data.batch_size=8", "data.num_workers=0", "engine.eval_every=1000"]
SMOKE_SWEEP = {"maskgit": (2, 4), "dit": (2, 4)}
SMOKE_ROOT = Path("/tmp/generate-smoke")


# ---- data -----------------------------------------------------------------------------------------


def read_split(data: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 28, 28) and int64 labels (N,) of an IDX split (``train`` or ``t10k``)."""
    from vitkit.data.arrays import find_idx, read_idx

    files = find_idx(str(data))
    if files is None or f"{prefix}-images" not in files:
        raise SystemExit(f"{data}: no {prefix} IDX files (train-images-idx3-ubyte.gz ...): pass --data FASHION_DIR")
    return read_idx(files[f"{prefix}-images"]), read_idx(files[f"{prefix}-labels"]).astype(np.int64)


def write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped unsigned-byte IDX file: magic 0x0008, the rank, big-endian sizes, the bytes."""
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def balanced_indices(labels: np.ndarray, per_class: int, parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``parts`` disjoint index sets with ``per_class`` images of every class each, drawn with ``rng``."""
    out = [[] for _ in range(parts)]
    for c in np.unique(labels):
        pool = rng.permutation(np.flatnonzero(labels == c))
        if len(pool) < parts * per_class:
            raise SystemExit(f"class {c} has {len(pool)} images, {parts} x {per_class} are needed: lower --n")
        for k in range(parts):
            out[k].append(pool[k * per_class:(k + 1) * per_class])
    return [np.sort(np.concatenate(p)) for p in out]


def smoke_subset(src: Path, dest: Path, seed: int) -> Path:
    """20 training and 10 test images per class of ``src`` as IDX files under ``dest`` (a 'fashion' folder,
    so vitkit names the classes as Fashion-MNIST's)."""
    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True, exist_ok=True)
    for prefix, per_class in (("train", 20), ("t10k", 10)):
        images, labels = read_split(src, prefix)
        (keep,) = balanced_indices(labels, per_class, 1, rng)
        write_idx(dest / f"{prefix}-images-idx3-ubyte.gz", images[keep])
        write_idx(dest / f"{prefix}-labels-idx1-ubyte.gz", labels[keep])
    return dest


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [-1, 1]: what every vitkit generator is trained on."""
    return torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 127.5 - 1  # a copy: IDX arrays are read-only


# ---- training stages ---------------------------------------------------------------------------------


def stage(root: Path, name: str, data: Path, args: list[str], reuse: bool) -> dict:
    """``vitkit train --data DATA --out ROOT/NAME --force ARGS`` in a fresh process; a finished stage of an
    earlier invocation with the same ``--run-root`` is reused (its record ``ROOT/NAME.stage.json``)."""
    out, record = root / name, root / f"{name}.stage.json"
    if reuse and record.is_file() and (out / "model.safetensors").is_file():
        print(f"{name}: reusing {out}", flush=True)
        return json.loads(record.read_text())
    print(f"{name}: vitkit train --data {data} --out {out} {' '.join(args)}", flush=True)
    res = cli_train(str(data), out, ["--force", *args])
    res = {k: v for k, v in res.items() if k != "stdout_tail"}
    res["run_dir"] = str(out)
    record.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{name}: {res['wall_s']:.0f} s, {res['summary'].get('steps')} steps", flush=True)
    return res


def plan_of(res: dict) -> dict:
    return {k: v["value"] for k, v in (res["run_info"].get("plan") or {}).items()}


# ---- sampling and scoring ------------------------------------------------------------------------------


@torch.no_grad()
def sample_set(objective, model, n: int, num_classes: int, steps: int, guidance: float, batch: int,
               seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``n`` class-balanced samples (class ``i % K`` for the i-th, as the run's evaluations draw them), drawn
    by the run's own objective; their labels and the seconds they took (tokenizer decoding included)."""
    labels = torch.arange(n) % num_classes
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    images = torch.cat([objective.sample(lab, model=model, steps=steps, guidance=guidance, generator=gen)
                        for lab in labels.split(batch)])
    return images.float().clamp(-1, 1), labels, time.perf_counter() - t0


def class_rows(images: torch.Tensor, labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """The first ``per_class`` samples of each class, class after class: one grid row per class."""
    return torch.cat([images[labels == c][:per_class] for c in labels.unique(sorted=True)])


@torch.no_grad()
def tokenizer_scores(tokenizer, real: torch.Tensor, batch: int) -> dict:
    """Reconstruction MSE (in [-1, 1] units) and the share of the codebook used, on ``real``."""
    err, used = 0.0, set()
    for x in real.split(batch):
        if getattr(tokenizer, "scales", None):
            idx = tokenizer.encode_scales(x)
            recon = tokenizer.decode_scales(idx)
            codes = torch.cat([i.reshape(-1) for i in idx])
        else:
            idx = tokenizer.encode(x)
            recon = tokenizer.decode(idx)
            codes = idx.reshape(-1)
        err += float(((recon.float() - x) ** 2).sum())
        used.update(codes.unique().tolist())
    return {"recon_mse": err / real.numel(), "codebook_usage": len(used) / int(tokenizer.codebook_size)}


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def val_metrics(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k.startswith("val_")}


def score_tokenizer(res: dict, real: torch.Tensor, batch: int, budget_s: float | None) -> dict:
    from vitkit.generate.load import load_tokenizer

    tokenizer, ref = load_tokenizer(res["run_dir"])
    scales = getattr(tokenizer, "scales", None)
    return {**tokenizer_scores(tokenizer.eval(), real, batch), "wall_s": res["wall_s"],
            "model": res["run_info"].get("model"), "params": count_params(tokenizer),
            "codebook_size": int(tokenizer.codebook_size), "grid": int(tokenizer.grid),
            "scales": list(scales) if scales else None, "sha256": ref.get("sha256"), "run_dir": res["run_dir"],
            "command": res["command"], "steps": res["summary"].get("steps"), "epochs": res["summary"].get("epochs"),
            "budget_s": budget_s, "run_summary": val_metrics(res["summary"])}


def score_generator(kind: str, res: dict, judge, ref_stats, floor: float, num_classes: int, n: int, args,
                    sweep_steps: tuple[int, ...] | None, grid_path: Path) -> tuple[dict, dict, list[dict]]:
    """The row of one generator, what its meta records, and its points of the steps sweep."""
    from vitkit.generate.grid import save_grid
    from vitkit.generate.load import load_generator
    from vitkit.generate.metrics import class_consistency, feature_stats, frechet_distance
    from vitkit.sample import _objective

    model, info = load_generator(res["run_dir"])
    # the run's objective, rebuilt from its config: it samples exactly as the run's evaluations did
    objective = _objective(model, info, len(info["classes"])).eval()
    run_guidance = float(objective.cfg.guidance)
    # VAR decodes one step per scale; the others sample in the steps their run evaluated with
    steps = len(info["tokenizer"].scales) if kind == "var" else int(objective.cfg.sample_steps)
    guidance, gpoints = run_guidance, []
    if args.guidance_sweep:
        guidance, gpoints = sweep_guidance(kind, objective, model, judge, ref_stats, num_classes, steps, args)
    images, labels, secs = sample_set(objective, model, n, num_classes, steps, guidance, args.batch, args.seed)
    feats, logits = judge(images)
    row = {"model": kind, "class_consistency": class_consistency(logits, labels),
           "fd": frechet_distance(*feature_stats(feats), *ref_stats), "fd_real_floor": floor,
           "sample_s_per_image": secs / n, "params": count_params(model), "wall_s": res["wall_s"]}
    per_row = min(8, n // num_classes)
    save_grid(class_rows(images, labels, per_row), grid_path, nrow=per_row)
    meta = {"generator": info["model_name"], "guidance": guidance, "run_guidance": run_guidance,
            "guidance_sweep": gpoints, "steps": steps,
            "objective": {k: v for k, v in info["objective"].items() if k != "references"},
            "tokenizer": TOKENIZER_OF[kind], "run_dir": res["run_dir"], "command": res["command"],
            "train_steps": res["summary"].get("steps"), "epochs": res["summary"].get("epochs"), "n_samples": n,
            "grid": str(grid_path), "run_summary": val_metrics(res["summary"])}
    print(f"{kind}: class consistency {row['class_consistency']:.2%}, FD {row['fd']:.3f} (floor {floor:.3f}), "
          f"{row['sample_s_per_image'] * 1000:.1f} ms/image at {steps} steps, guidance {guidance:g}", flush=True)
    points = []
    m = (args.n_sweep // num_classes) * num_classes
    for s in sweep_steps or (steps,):
        imgs, labs, secs = sample_set(objective, model, m, num_classes, s, guidance, args.batch, args.seed + 1)
        cc = class_consistency(judge(imgs)[1], labs)
        points.append({"model": kind, "steps": s, "sample_s_per_image": secs / m, "class_consistency": cc, "n": m,
                       "guidance": guidance})
        print(f"  {kind} at {s} steps: {secs / m * 1000:.1f} ms/image, class consistency {cc:.2%}", flush=True)
    return row, meta, points


def sweep_guidance(kind: str, objective, model, judge, ref_stats, num_classes: int, steps: int, args
                   ) -> tuple[float, list[dict]]:
    """Class consistency and FD of ``--n-guidance`` samples (seed + 2, disjoint from the row's and the steps
    sweep's draws) at each ``--guidance-sweep`` value; the chosen guidance is the one with the highest class
    consistency (the lower guidance on a tie). FD here is of ``--n-guidance`` samples against the same
    ``--n`` real images: comparable along the sweep, higher than the row's FD when fewer samples."""
    from vitkit.generate.metrics import class_consistency, feature_stats, frechet_distance

    m = (args.n_guidance // num_classes) * num_classes
    points = []
    for g in args.guidance_sweep:
        imgs, labs, secs = sample_set(objective, model, m, num_classes, steps, g, args.batch, args.seed + 2)
        feats, logits = judge(imgs)
        point = {"model": kind, "guidance": g, "class_consistency": class_consistency(logits, labs),
                 "fd": frechet_distance(*feature_stats(feats), *ref_stats), "n": m, "steps": steps,
                 "sample_s_per_image": secs / m}
        points.append(point)
        print(f"  {kind} at guidance {g:g}: class consistency {point['class_consistency']:.2%}, FD {point['fd']:.3f} "
              f"(n={m}), {secs / m * 1000:.1f} ms/image", flush=True)
    best = max(points, key=lambda p: (p["class_consistency"], -p["guidance"]))
    for p in points:
        p["chosen"] = p is best
    return float(best["guidance"]), points


def goal_of(rows: list[dict], floor: float) -> dict | None:
    """The issue's goal on the model with the best class consistency."""
    if not rows:
        return None
    best = max(rows, key=lambda r: r["class_consistency"])
    return {"best_model": best["model"], "class_consistency": best["class_consistency"],
            "fd_over_floor": best["fd"] / floor if floor > 0 else None,
            "met": best["class_consistency"] >= GOAL_CC and best["fd"] <= GOAL_FD_RATIO * floor,
            "done_threshold_met": best["class_consistency"] >= DONE_CC,
            "rule": f"best class consistency >= {GOAL_CC:.0%} and its FD within {GOAL_FD_RATIO:g}x the real-vs-real "
                    f"floor (below {DONE_CC:.0%} class consistency is not done)"}


# ---- main ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(FASHION), help="the Fashion-MNIST IDX folder")
    ap.add_argument("--budget", default="20m", help="training budget of each generator (engine.time_budget)")
    ap.add_argument("--tokenizer-budget", default="10m", help="training budget of each tokenizer")
    ap.add_argument("--judge-budget", default="10m", help="training budget of the judge classifier")
    ap.add_argument("--models", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    ap.add_argument("--n", type=int, default=1000, help="samples per model, and real images per side of the FD")
    ap.add_argument("--n-sweep", type=int, default=200, help="samples per point of the steps sweep")
    ap.add_argument("--batch", type=int, default=250, help="sampling batch")
    ap.add_argument("--seed", type=int, default=0, help="draws the real subsets and the samples")
    ap.add_argument("--guidance-sweep", default=None, metavar="G1,G2,...",
                    help="choose each generator's guidance among these by class consistency on --n-guidance "
                         "separately seeded samples (default: the guidance each run recorded)")
    ap.add_argument("--n-guidance", type=int, default=500, help="samples per point of the guidance sweep")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for the generators")
    ap.add_argument("--judge-in-runs", action="store_true",
                    help="also pass objective.judge to the generator runs (scored at each of their evaluations)")
    ap.add_argument("--run-root", default=None, help="where the runs go (default: runs/generate-fashion-<time>); "
                                                     "finished stages found there are reused")
    ap.add_argument("--out", default=str(RESULTS / "generate.json"), help="the JSON; the grids go beside it")
    ap.add_argument("--smoke", action="store_true", help="the whole pipeline with the _test models, 3 steps each, "
                                                         "40 samples, a 300-image subset; results to /tmp")
    args = ap.parse_args()
    args.kinds = [k for k in args.models.split(",") if k]
    if set(args.kinds) - set(KINDS):
        raise SystemExit(f"unknown model {sorted(set(args.kinds) - set(KINDS))}: choose from {', '.join(KINDS)}")
    args.models_of, args.engine, args.sweep = {}, list(QUIET), SWEEP
    args.data = Path(args.data).expanduser()
    try:
        args.guidance_sweep = [float(g) for g in args.guidance_sweep.split(",") if g] if args.guidance_sweep else []
    except ValueError:
        raise SystemExit(f"--guidance-sweep takes comma-separated numbers, e.g. 1,2,3; got {args.guidance_sweep!r}") from None
    if args.smoke:
        args.budget = args.tokenizer_budget = args.judge_budget = "2m"
        args.n, args.n_sweep, args.n_guidance, args.batch, args.judge_in_runs = 40, 20, 20, 20, True
        args.out = str(SMOKE_ROOT / "generate.json")
        args.run_root = args.run_root or str(SMOKE_ROOT / "runs")
        args.data = smoke_subset(args.data, SMOKE_ROOT / "fashion-mnist-smoke", args.seed)
        args.models_of, args.sweep = SMOKE_MODELS, SMOKE_SWEEP
        args.engine += SMOKE_ENGINE
    return args


def train_stages(args, root: Path) -> tuple[dict, dict, dict]:
    """0. the judge, 1. the tokenizers, 2. the generators: each a fresh ``vitkit train`` process."""
    reuse = not args.smoke
    judge = stage(root, "judge", args.data, [f"engine.time_budget={args.judge_budget}",
                                             *args.models_of.get("judge", []), *args.engine], reuse)
    toks = {}
    for name in sorted({TOKENIZER_OF[k] for k in args.kinds} - {None}):
        model = args.models_of.get(name) or (["model.name=msvq_nano"] if name == "msvq" else [])
        toks[name] = stage(root, name, args.data, ["objective.name=vqvae", f"engine.time_budget={args.tokenizer_budget}",
                                                   *model, *args.engine], reuse)
    extra = [f"objective.judge={root / 'judge'}", f"objective.judge_samples={args.n}"] if args.judge_in_runs else []
    if args.smoke:
        extra += ["objective.grid_samples=10"]
    gens = {}
    for kind in args.kinds:
        tok = [f"objective.tokenizer={root / TOKENIZER_OF[kind]}"] if TOKENIZER_OF[kind] else []
        gens[kind] = stage(root, kind, args.data, [f"objective.name={kind}", *tok, f"engine.time_budget={args.budget}",
                                                   *args.models_of.get(kind, []), *args.engine, *extra, *args.set],
                           reuse)
    return judge, toks, gens


def main() -> None:
    args = parse_args()
    import vitkit
    from vitkit.engine.budget import parse_duration
    from vitkit.generate.metrics import class_consistency, feature_stats, frechet_distance
    from vitkit.objectives.judge import load_judge

    out = Path(args.out)
    root = Path(args.run_root or REPO / "runs" / f"generate-fashion-{time.strftime('%Y%m%d-%H%M%S')}")
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    judge_res, tok_res, gen_res = train_stages(args, root)

    # the judge, and the real test images it compares against (two disjoint class-balanced subsets)
    judge = load_judge(root / "judge")
    test_images, test_labels = read_split(args.data, "t10k")
    num_classes = int(test_labels.max()) + 1
    judge.check_classes(num_classes)
    n = (args.n // num_classes) * num_classes
    idx_a, idx_b = balanced_indices(test_labels, n // num_classes, 2, np.random.default_rng(args.seed))
    real_a, real_b = to_pixels(test_images[idx_a]), to_pixels(test_images[idx_b])
    feats_a, logits_a = judge(real_a)
    stats_a = feature_stats(feats_a)
    floor = frechet_distance(*stats_a, *feature_stats(judge(real_b)[0]))
    real_cc = class_consistency(logits_a, torch.from_numpy(test_labels[idx_a]))
    print(f"judge {judge.model_name}: test acc {judge.test_acc}, {real_cc:.2%} on the real subset; real-vs-real "
          f"FD floor {floor:.3f} (N={n})", flush=True)

    tokenizers = {}
    for name, res in tok_res.items():
        tokenizers[name] = score_tokenizer(res, real_a, args.batch, parse_duration(args.tokenizer_budget))
        print(f"tokenizer {name}: recon MSE {tokenizers[name]['recon_mse']:.4f}, codebook usage "
              f"{tokenizers[name]['codebook_usage']:.1%}", flush=True)
    rows, models, sweep = [], {}, []
    for kind, res in gen_res.items():
        row, meta, points = score_generator(kind, res, judge, stats_a, floor, num_classes, n, args,
                                            args.sweep.get(kind), out.parent / f"generate_{kind}.png")
        rows.append(row)
        models[kind] = {**meta, "budget_s": parse_duration(args.budget)}
        sweep += points

    vq = tokenizers.get("vq") or next(iter(tokenizers.values()), None)
    result = {
        "tokenizer": None if vq is None else {k: vq[k] for k in ("recon_mse", "codebook_usage", "wall_s")},
        "rows": rows,
        "meta": {
            "judge": {**judge.reference, "img_size": list(judge.img_size), "num_features": judge.num_features,
                      "budget_s": parse_duration(args.judge_budget), "wall_s": judge_res["wall_s"],
                      "class_consistency_real": real_cc, "steps": judge_res["summary"].get("steps"),
                      "epochs": judge_res["summary"].get("epochs"), "command": judge_res["command"],
                      "plan": plan_of(judge_res)},
            "budgets_s": {"judge": parse_duration(args.judge_budget),
                          "tokenizer": parse_duration(args.tokenizer_budget), "generator": parse_duration(args.budget)},
            "guidance": {k: v["guidance"] for k, v in models.items()},
            "guidance_rule": (f"chosen per model among {args.guidance_sweep} by class consistency on "
                              f"{args.n_guidance} samples drawn with seed {args.seed + 2} (the rows' samples: seed "
                              f"{args.seed})") if args.guidance_sweep else "each run's recorded objective.guidance",
            "tokenizers": tokenizers, "models": models, "steps_sweep": sweep, "goal": goal_of(rows, floor),
            "n_samples": n, "n_real_per_side": n, "seed": args.seed, "data": str(args.data), "run_root": str(root),
            "wall_s": time.time() - t_start, "smoke": args.smoke,
            "protocol": "fresh vitkit train process per stage; N class-balanced samples per model at its run's "
                        "steps and the guidance of guidance_rule; judge = a Fashion-MNIST classifier trained here, features = its pooled "
                        "pre-logits; FD vs N class-balanced real test images; floor = two disjoint real N-subsets",
            "machine": machine(), "versions": versions(vitkit),
        },
    }
    if out.resolve().parent == RESULTS.resolve():
        out = write_json(out.name, result)
    else:  # --smoke, or another --out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"tokenizer": result["tokenizer"], "rows": rows, "goal": result["meta"]["goal"]}, indent=2))
    print(f"wrote {out} and the grids beside it ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
