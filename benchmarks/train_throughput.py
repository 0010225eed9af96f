"""Training throughput on a CPU: the vitkit engine against a hand-written loop with the identical
optimizer, and the batched augmentation path against the per-sample worker path. Writes
results/train_throughput.json.

Every measurement is training img/s, ``batch * steps / (t_end - t_start)`` between the end of
warm-up step ``warmup`` and the end of the last step, timed the same way in every loop (for the
engine by a step-end hook), so it includes waiting for data. Nothing is evaluated inside the timed
window. Each round runs every measurement, alternating their order so that load drifts on the
machine hit all alike; the reported numbers are medians over rounds.

**1. Engine vs hand loop** (``ratio_engine_vs_hand``; goal >= 1.0). ``vitkit.train.build_run``
builds the loader, the batch augmentation, the ``Supervised`` objective and the ``Trainer`` on the
CIFAR-10 JPEG tar (crop and flip in the loader workers, normalisation on the batch; RandAugment,
erasing, mixup and label smoothing off; drop-path 0; constant lr; bf16 autocast where the CPU has
it). The hand loop trains timm's model with the same architecture and initial weights on the same
loader and batch augmentation, over the same batches (both start at epoch 0)::

    for batch in loader:
        batch = augment(batch)
        with torch.autocast("cpu", torch.bfloat16):
            loss = F.cross_entropy(model(batch["image"]), batch["label"])
        opt.zero_grad(); loss.backward(); opt.step()

``opt`` is torch's AdamW over the engine's own parameter groups (no weight decay on norms, biases,
position embedding and class token), with the engine's lr, betas, eps and fused/foreach flags:
:func:`same_optimizer` builds it from the engine's optimizer and asserts that the two agree. The
same hand loop also trains vitkit's model (``hand_loop_vitkit_model_img_s``), which splits the
ratio in two: ``ratio_engine_vs_hand_same_model`` (the loop alone) and
``ratio_vitkit_vs_timm_model`` (the model alone).

What the engine does per step that the hand loop does not, read from both code paths
(``Trainer._train_epoch`` and what it calls):

- ``prepare_batch``: a walk over the batch dict (``to_device`` is the identity on a CPU); the
  count of replaced files (a sum over the batch, read by the host; on CUDA it now stays on the
  device, ``StepTally.add_files``).
- ``Supervised.forward``: the logits cast to float32 (the hand loop's cross-entropy does the same
  cast under autocast), ``acc1`` (argmax, compare, mean on a (B, 10) tensor), a look-up of the
  model's ``aux_loss``.
- The non-finite check: ``isfinite`` on the loss and a host read (on CUDA that read made every
  step wait for the device; it now stays there, see ``StepTally``). ``loss / accum_steps``;
  ``GradScaler.scale``/``step``/``update`` return at once when the scaler is off.
- ``TrainLogger.on_micro_batch``: a detach, a float cast and an add per output (loss, acc1).
- The scheduler writes the lr into the two parameter groups.
- ``_on_step_end``: a ``StepContext``; a snapshot of the RNGs (torch's 5 KB CPU generator state,
  Python's and numpy's Mersenne states), taken every step so that a failure can checkpoint the
  last completed step; the hooks; the log-step test; the stop rule.

Each item is a few scalar operations or Python calls, microseconds each, against a step of
about 1.1 s here (the previous run: 112.7 img/s at batch 128), where a ratio of 0.94 is about
70 ms per step. So the per-step bookkeeping cannot explain it; what can are the two things that
differed besides: the optimizer (the engine ran fused AdamW with parameter groups, the hand loop
torch's default, which on a CPU is the per-tensor loop, with weight decay on every parameter: now
identical) and the model (vitkit's ViT against timm's: now measured on its own). The data path
is the same object on both sides. ``--profile`` records, per loop, the CPU time per step of its
most expensive operators (key ``profile``), to name what differs if a gap remains. In one process
the loop that runs first is the slower one by a few percent (measured: the engine below the hand loop
in the rounds where it ran first, above it where it ran last), so only the alternating rounds'
medians compare the loops; the profile runs them once each in a fixed order.

**2. Batched vs worker augmentation** (``ratio_batched_vs_worker``, goal >= 1.3;
``ratio_batched_vs_worker_light``, goal >= 1.0). The engine trains the conv-stem nano ViT the plan
uses for small images (``--aug-model``) at 64 px on the same tar, once with ``data.augment_on=device``
(decoded once into the store, crop, flip and RandAugment batched in the main process) and once with
``data.augment_on=workers`` (``data.store='off'``: per-sample PIL in the loader workers, on the same
cores as the model). ``compute_only_img_s`` trains the same model with the same optimizer on one
batch, drawn and augmented once and used for every step: data for free, the most any data path can
reach, so ``ceiling_ratio_vs_worker`` is the largest ratio the batched path could show here. DeiT
strength: RandAugment m9 (mstd 0.5, inc1), erasing 0.25, Mixup 0.8 / CutMix 1.0, label smoothing
0.1; light: crop and flip only (the CIFAR recipe). ``build_s`` is the
time ``build_run`` took (the store is decoded there, outside the timed window). The run's
``run.json`` entry ``data_path`` must show the path asked for, else the benchmark stops. The keys
come with ``data.augment_on``: on a vitkit without it the benchmark stops with that message
(``--only engine`` runs section 1 alone, recorded in ``sections``).

Time plan on the 2-core machine (defaults, 2 rounds): section 1 about 30 s per loop and round
(engine, two hand loops, the data pipeline alone); section 2 four builds per round (the tar is
scanned each time) and four shorter loops: about 10 minutes in all.

    python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --smoke            # < 1 minute, prints, writes nothing
    python benchmarks/train_throughput.py --only engine --steps 10 --rounds 1 --profile
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F

import vitkit
from vitkit._peers import import_peer
from vitkit.config import DataConfig, load_config
from vitkit.engine.runtime import autocast, resolve_amp
from vitkit.train import build_run

from _common import machine, versions, write_json

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpg.tar.gz"
DEIT = ["data.auto_augment=rand-m9-mstd0.5-inc1", "data.re_prob=0.25", "data.mixup=0.8", "data.cutmix=1.0",
        "data.label_smoothing=0.1"]
LIGHT = ["data.auto_augment=null", "data.re_prob=0", "data.mixup=0", "data.cutmix=0", "data.label_smoothing=0"]
# Quoted: YAML reads a bare off as false.
PATHS = {"device": ["data.augment_on=device"], "workers": ["data.augment_on=workers", "data.store='off'"]}
GOALS = {"ratio_engine_vs_hand": ">= 1.0", "ratio_batched_vs_worker": ">= 1.3",
         "ratio_batched_vs_worker_light": ">= 1.0"}


class _StepClock:
    """Hook: perf_counter at the end of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, ctx) -> None:
        self.times.append(time.perf_counter())


def _rate(times: list[float], warmup: int, batch: int) -> float:
    steps = len(times) - warmup
    return batch * steps / (times[-1] - times[warmup - 1])


def engine_rate(trainer, warmup: int, batch: int) -> float:
    clock = _StepClock()
    trainer.hooks.append(clock)
    trainer.fit()
    return _rate(clock.times, warmup, batch)


def _describe(opt: torch.optim.Optimizer, names: dict[int, str]) -> list:
    """What makes two optimizers step alike: their flags, and each group's parameters and settings."""
    keys = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "fused", "capturable",
            "decoupled_weight_decay")
    flags = tuple((k, opt.defaults.get(k)) for k in keys)
    groups = [(tuple(names[id(p)] for p in g["params"]), tuple((k, g.get(k)) for k in keys)) for g in opt.param_groups]
    return [type(opt).__name__, flags, groups]


def same_optimizer(engine_opt: torch.optim.Optimizer, model: torch.nn.Module, prefix: str = "model.") -> torch.optim.Optimizer:
    """torch's optimizer of ``engine_opt``'s class over ``model``'s parameters, grouped as the engine
    grouped its objective's (whose names carry ``prefix``), with the same settings; asserts that the two agree."""
    named = dict(model.named_parameters())
    groups = [{**{k: v for k, v in g.items() if k not in ("params", "names", "lr_scale")},
               "params": [named[n.removeprefix(prefix)] for n in g["names"]]} for g in engine_opt.param_groups]
    d = engine_opt.defaults
    opt = type(engine_opt)(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"],
                           foreach=d["foreach"], fused=d["fused"])
    ours = {id(p): n.removeprefix(prefix) for g in engine_opt.param_groups for p, n in zip(g["params"], g["names"])}
    theirs = {id(p): n for n, p in named.items()}
    assert sorted(theirs.values()) == sorted(ours.values()), "the hand loop's model has other parameters"
    assert _describe(opt, theirs) == _describe(engine_opt, ours), "the hand loop's optimizer differs from the engine's"
    return opt


def _timed_steps(model, opt, batches, n_steps: int, amp) -> list[float]:
    """perf_counter after each of ``n_steps`` plain training steps of ``model`` over ``batches`` (augmented)."""
    model.train()
    device = torch.device("cpu")
    times = []
    for batch_ in batches:
        with autocast(amp, device):
            loss = F.cross_entropy(model(batch_["image"]), batch_["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter())
        if len(times) == n_steps:
            break
    return times


def hand_loop_rate(model, opt, loader, augment, n_steps: int, warmup: int, batch: int, amp) -> float:
    # The engine's first epoch from its start: the same batches (the engine advanced the sampler).
    loader.set_epoch(0)
    loader.sampler.load_state_dict({"epoch": 0, "position": 0})
    return _rate(_timed_steps(model, opt, map(augment, loader), n_steps, amp), warmup, batch)


def data_rate(loader, augment, n_batches: int, warmup: int, batch: int) -> float:
    times = []
    with torch.no_grad():
        for batch_ in loader:
            augment(batch_)
            times.append(time.perf_counter())
            if len(times) == n_batches:
                break
    return _rate(times, warmup, batch)


def build(overrides: list[str], out_dir: str):
    """(trainer, run info, seconds to build) for a run of ``overrides`` with nothing evaluated."""
    t0 = time.perf_counter()
    trainer, info = build_run(load_config(None, [*overrides, f"engine.out_dir={out_dir}"], plan=False), verbose=False)
    trainer.val_loader = None  # only training is timed
    return trainer, info, time.perf_counter() - t0


def section1_loops(args, common: list[str], timm, amp, tmp: str) -> tuple[dict, object]:
    """Section 1's three loops, each ``() -> img/s``, over one loader; and the engine's trainer."""
    model_args = {"img_size": args.img_size, "patch_size": args.patch_size, **args.model_args}
    over = [*common, *LIGHT, f"model.name={args.model}", *(f"model.args.{k}={v}" for k, v in model_args.items()
                                                           if k != "img_size")]
    n = args.warmup + args.steps
    trainer, info, _ = build(over, tmp)
    model_args["num_classes"] = info["num_classes"]
    peer = timm.create_model(args.model, drop_path_rate=0.0, **model_args)
    ours = vitkit.create_model(args.model, drop_path_rate=0.0, **model_args)
    trainer.objective.model.load_state_dict(peer.state_dict(), strict=True)
    ours.load_state_dict(peer.state_dict(), strict=True)
    loader, augment = trainer.train_loader, trainer.train_transform
    opt_peer, opt_ours = same_optimizer(trainer.optimizer, peer), same_optimizer(trainer.optimizer, ours)
    loops = {
        "engine": lambda: engine_rate(trainer, args.warmup, args.batch),
        "hand_loop": lambda: hand_loop_rate(peer, opt_peer, loader, augment, n, args.warmup, args.batch, amp),
        "hand_loop_vitkit_model": lambda: hand_loop_rate(ours, opt_ours, loader, augment, n, args.warmup,
                                                         args.batch, amp),
    }
    return loops, trainer


def engine_vs_hand(args, common: list[str], timm, amp, r: int, rates: dict) -> dict:
    """One round of section 1; returns what the JSON records about the optimizers."""
    n = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        loops, trainer = section1_loops(args, common, timm, amp, tmp)
        for key in list(loops) if r % 2 == 0 else list(reversed(loops)):
            rates[key].append(loops[key]())
        loader, augment = trainer.train_loader, trainer.train_transform
        loader.set_epoch(r + 100)
        rates["data"].append(data_rate(loader, augment, n, args.warmup, args.batch))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items()), flush=True)
        d = trainer.optimizer.defaults
        return {"name": type(trainer.optimizer).__name__, "fused": d["fused"], "foreach": d["foreach"],
                "groups": [{"params": len(g["params"]), "weight_decay": g["weight_decay"]}
                           for g in trainer.optimizer.param_groups],
                "num_workers": loader.num_workers}


def profile_loops(args, common: list[str], timm, amp) -> dict:
    """The operators each loop of section 1 spends its CPU time in (torch.profiler, one untimed run
    each): the per-step difference between the engine and the hand loops, operator by operator."""
    from torch.profiler import ProfilerActivity, profile

    n = args.warmup + args.steps
    out = {"steps": n, "note": "self CPU time per step of the 25 most expensive operators of each loop"}
    with tempfile.TemporaryDirectory() as tmp:
        loops, _ = section1_loops(args, common, timm, amp, tmp)
        for key, loop in loops.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                loop()
            ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            out[key] = {
                "self_cpu_ms_per_step": round(sum(e.self_cpu_time_total for e in ops) / 1e3 / n, 2),
                "top": [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / n, 3),
                         "calls_per_step": round(e.count / n, 2)} for e in ops[:25]],
            }
            print(f"profiled {key}: {out[key]['self_cpu_ms_per_step']} ms of CPU per step", flush=True)
    return out


def compute_only_rate(trainer, n_steps: int, warmup: int, batch: int, amp) -> float:
    """img/s of the run's model and optimizer on one batch, drawn and augmented once, used for every step: the
    training speed with free data, the most any data path can reach (the engine adds about nothing, section 1)."""
    fixed = trainer.train_transform(next(iter(trainer.train_loader)))
    times = _timed_steps(trainer.objective.model, trainer.optimizer, itertools.repeat(fixed), n_steps, amp)
    return _rate(times, warmup, batch)


def batched_vs_worker(args, common: list[str], r: int, runs: dict, amp=None) -> None:
    """One round of section 2: the engine under each augmentation strength on each path."""
    over = [*common, f"model.name={args.aug_model}"]
    cases = [(s, p) for s in ("deit", "light") for p in PATHS]
    for strength, path in cases if r % 2 == 0 else reversed(cases):
        with tempfile.TemporaryDirectory() as tmp:
            trainer, info, build_s = build([*over, *(DEIT if strength == "deit" else LIGHT), *PATHS[path]], tmp)
            took = (info.get("data_path") or {}).get("augment_on")
            if took != path:
                raise SystemExit(f"data.augment_on={path} was asked for, but the run took {took!r} "
                                 f"(run.json data_path: {info.get('data_path')}): nothing to compare")
            rate = engine_rate(trainer, args.warmup, args.batch)
        entry = runs.setdefault(strength, {}).setdefault(path, {"img_s": [], "build_s": [], "data_path": None})
        entry["img_s"].append(round(rate, 2))
        entry["build_s"].append(round(build_s, 2))
        entry["data_path"] = info["data_path"]
        print(f"round {r}: {strength} augmentation, {path} path: {rate:.1f} img/s (built in {build_s:.1f} s)",
              flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _, _ = build([*over, *LIGHT, *PATHS["device"]], tmp)
        rate = compute_only_rate(trainer, args.warmup + args.steps, args.warmup, args.batch, amp)
    runs.setdefault("compute_only", {"img_s": []})["img_s"].append(round(rate, 2))
    print(f"round {r}: the model and optimizer alone on one fixed batch: {rate:.1f} img/s", flush=True)


def check_batched_path_key() -> None:
    if "augment_on" not in {f.name for f in fields(DataConfig)}:
        raise SystemExit(
            "data.augment_on is not a config key of this vitkit: the batched path comes with the decode-once store "
            "(data.store / data.augment_on). Use a vitkit that has it, or run section 1 alone with --only engine."
        )


def _smoke(args) -> None:
    """A tiny, fast configuration of both sections (the shapes data, 2-block models, a few steps)."""
    args.data, args.batch, args.steps, args.warmup, args.rounds = "shapes:256", 16, 2, 1, 1
    args.img_size, args.patch_size, args.workers = 32, 8, 1
    args.model_args = {"depth": 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 JPEG tar (class folders)")
    ap.add_argument("--model", default="vit_tiny_patch16_224", help="section 1: a name both vitkit and timm register")
    ap.add_argument("--aug-model", default="vit_nano_convstem_patch16_64", help="section 2: a vitkit model")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=8, help="section 1's patch size")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: vitkit's)")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"],
                    help="bf16 autocast in every loop; auto: when the CPU has native bf16")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--only", choices=["engine", "augment"], help="run one section")
    ap.add_argument("--profile", action="store_true",
                    help="after the rounds, profile each loop of section 1 once (untimed): key profile")
    ap.add_argument("--smoke", action="store_true", help="tiny and fast; prints the result, writes nothing")
    ap.add_argument("--out", default=None, help="file name under results/ (default: train_throughput.json; "
                                                "none with --smoke)")
    args = ap.parse_args()
    args.model_args = {}
    if args.smoke:
        _smoke(args)
    sections = [args.only] if args.only else ["engine", "augment"]
    if "augment" in sections:
        check_batched_path_key()
    timm = import_peer("timm") if "engine" in sections else None
    if "engine" in sections and timm is None:
        raise SystemExit("the peer library is needed for the side-by-side run: pip install -e '.[dev]'")
    amp = resolve_amp(args.amp, torch.device("cpu"))
    load_start = os.getloadavg()
    n = args.warmup + args.steps
    common = [
        f"data.path={args.data}", f"data.img_size={args.img_size}", f"data.batch_size={args.batch}",
        "model.drop_path_rate=0", f"optim.lr={args.lr}", "optim.scale_lr=false",
        f"optim.weight_decay={args.weight_decay}", "schedule.name=constant", "schedule.warmup_steps=0",
        f"engine.amp={'bf16' if amp is not None else 'none'}", "engine.epochs=1", f"engine.max_steps={n}",
        "engine.tensorboard=false", "engine.plots=false", "engine.device=cpu", f"engine.log_every={n}",
        *([f"data.num_workers={args.workers}"] if args.workers is not None else []),
    ]
    rates: dict[str, list[float]] = {"engine": [], "hand_loop": [], "hand_loop_vitkit_model": [], "data": []}
    aug_runs: dict = {}
    optimizer = None
    for r in range(args.rounds):
        if "engine" in sections:
            optimizer = engine_vs_hand(args, common, timm, amp, r, rates)
        if "augment" in sections:
            batched_vs_worker(args, common, r, aug_runs, amp)

    payload = {
        "benchmark": "training img/s on a CPU: the vitkit engine vs a hand-written loop with the identical "
                     "optimizer on the same batches; the batched augmentation path vs the per-sample worker path. "
                     "Medians over rounds.",
        "sections": sections,
        "goals": {k: v for k, v in GOALS.items() if ("engine" if "engine" in k else "augment") in sections},
        "data": Path(args.data).name,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "amp": str(amp).replace("torch.", "") if amp is not None else "none",
    }
    if "engine" in sections:
        med = {k: statistics.median(v) for k, v in rates.items()}
        payload.update({
            "model": args.model,
            "model_args": {"img_size": args.img_size, "patch_size": args.patch_size, **args.model_args},
            "optimizer": {**optimizer, "lr": args.lr, "weight_decay": args.weight_decay,
                          "note": "the hand loops use torch's optimizer with the engine's groups and flags"},
            "engine_img_s": round(med["engine"], 2),
            "hand_loop_img_s": round(med["hand_loop"], 2),
            "hand_loop_vitkit_model_img_s": round(med["hand_loop_vitkit_model"], 2),
            "ratio_engine_vs_hand": round(med["engine"] / med["hand_loop"], 4),
            "ratio_engine_vs_hand_same_model": round(med["engine"] / med["hand_loop_vitkit_model"], 4),
            "ratio_vitkit_vs_timm_model": round(med["hand_loop_vitkit_model"] / med["hand_loop"], 4),
            "data_img_s": round(med["data"], 2),
            "data_vs_train_ratio": round(med["data"] / med["engine"], 3),
            "runs": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        })
        if args.profile:
            payload["profile"] = profile_loops(args, common, timm, amp)
    if "augment" in sections:
        compute_only = statistics.median(aug_runs["compute_only"]["img_s"])
        med_aug = {s: {p: statistics.median(e["img_s"]) for p, e in paths.items()} for s, paths in aug_runs.items()
                   if s != "compute_only"}
        payload.update({
            "aug_model": args.aug_model,
            "aug_img_size": args.img_size,
            "augmentation": {"deit": DEIT, "light": LIGHT, "paths": PATHS},
            "augment_img_s": {s: {p: round(v, 2) for p, v in paths.items()} for s, paths in med_aug.items()},
            "ratio_batched_vs_worker": round(med_aug["deit"]["device"] / med_aug["deit"]["workers"], 4),
            "ratio_batched_vs_worker_light": round(med_aug["light"]["device"] / med_aug["light"]["workers"], 4),
            # the model and optimizer on one fixed batch: the ceiling of every data path, and of the ratios
            "compute_only_img_s": round(compute_only, 2),
            "ceiling_ratio_vs_worker": round(compute_only / med_aug["deit"]["workers"], 4),
            "ceiling_ratio_vs_worker_light": round(compute_only / med_aug["light"]["workers"], 4),
            "batched_share_of_ceiling": {s: round(med_aug[s]["device"] / compute_only, 4) for s in med_aug},
            "augment_runs": aug_runs,
        })
    payload["meta"] = {
        "machine": machine(),
        "versions": versions(vitkit, timm),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "smoke": args.smoke,
        "quiet": None,  # filled in by whoever runs it on a quiet machine: how quiet it was
    }
    summary = {k: v for k, v in payload.items() if k.startswith("ratio_") or k.endswith("_img_s")}
    print(json.dumps(summary, indent=1), flush=True)
    if args.smoke and args.out is None:
        return
    print("wrote", write_json(args.out or "train_throughput.json", payload))


if __name__ == "__main__":
    main()
