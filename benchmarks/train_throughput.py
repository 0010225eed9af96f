"""Training throughput: the vitkit engine vs a plain PyTorch loop around timm's model, and the
data pipeline alone, in one process on the same data. Writes results/train_throughput.json.

What is compared, each round (rounds alternate which loop goes first, so that load drifts on
the machine hit both alike; the reported numbers are medians over rounds):

- **engine**: ``vitkit.train.build_run`` on the CIFAR-10 JPEG tar (read in place) builds the
  loader, the batch augmentation, the ``Supervised`` objective and the ``Trainer``;
  ``Trainer.fit`` runs ``warmup + steps`` optimizer steps (AdamW, constant lr, autocast).
- **hand loop**: timm's model with the same architecture and the same initial weights, fed
  by the *same* loader and batch augmentation, in the loop a user would write::

      for batch in loader:
          batch = augment(batch)
          with torch.autocast("cpu", torch.bfloat16):
              loss = F.cross_entropy(model(batch["image"]), batch["label"])
          opt.zero_grad(); loss.backward(); opt.step()      # torch.optim.AdamW

- **data**: the same loader and batch augmentation with no model, for the same number of
  batches: what the pipeline can deliver while the trainer is idle.

Training img/s is ``batch * steps / (t_end - t_start)`` between the end of warm-up step
``warmup`` and the end of the last step, timed the same way for both loops (for the engine by
a step-end hook), so it includes waiting for data. Augmentation is the loader's random-resized
crop and flip plus normalisation on both sides (RandAugment, erasing, mixup and label smoothing
off), drop-path is 0, and nothing is evaluated inside the timed window.

Default model: ViT-Tiny (embed 192, depth 12, 3 heads) at 64 px with patch 8 (64 patch tokens):
``vit_tiny_patch16_224`` built with ``img_size=64, patch_size=8, num_classes=10`` on both sides.

    python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --steps 10 --rounds 1 --amp none
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import vitkit
from vitkit._peers import import_peer
from vitkit.config import load_config
from vitkit.engine.runtime import resolve_amp
from vitkit.train import build_run

from _common import machine, versions, write_json

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpg.tar.gz"


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


def hand_loop_rate(
    model, loader, augment, epoch: int, n_steps: int, warmup: int, batch: int, amp, lr: float, wd: float
) -> float:
    loader.set_epoch(epoch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    model.train()
    times = []
    for batch_ in loader:
        batch_ = augment(batch_)
        with torch.autocast("cpu", dtype=amp) if amp is not None else nullcontext():
            loss = F.cross_entropy(model(batch_["image"]), batch_["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter())
        if len(times) == n_steps:
            break
    return _rate(times, warmup, batch)


def data_rate(loader, augment, n_batches: int, warmup: int, batch: int) -> float:
    times = []
    with torch.no_grad():
        for batch_ in loader:
            augment(batch_)
            times.append(time.perf_counter())
            if len(times) == n_batches:
                break
    return _rate(times, warmup, batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 JPEG tar (class folders)")
    ap.add_argument("--model", default="vit_tiny_patch16_224", help="a name both vitkit and timm register")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"],
                    help="bf16 autocast on both sides; auto: when the CPU has native bf16")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--out", default="train_throughput.json")
    args = ap.parse_args()
    timm = import_peer("timm")
    if timm is None:
        raise SystemExit("the peer library is needed for the side-by-side run: pip install -e '.[dev]'")
    amp = resolve_amp(args.amp, torch.device("cpu"))
    load_start = os.getloadavg()
    n = args.warmup + args.steps
    overrides = [
        f"data.path={args.data}", f"data.img_size={args.img_size}", f"data.batch_size={args.batch}",
        "data.auto_augment=null", "data.re_prob=0", "data.mixup=0", "data.cutmix=0", "data.label_smoothing=0",
        f"model.name={args.model}", "model.drop_path_rate=0", f"model.args.patch_size={args.patch_size}",
        f"optim.lr={args.lr}", "optim.scale_lr=false", f"optim.weight_decay={args.weight_decay}",
        "schedule.name=constant", "schedule.warmup_steps=0",
        f"engine.amp={'bf16' if amp is not None else 'none'}", "engine.epochs=1", f"engine.max_steps={n}",
        "engine.tensorboard=false", "engine.plots=false", "engine.device=cpu", f"engine.log_every={n}",
    ]
    rates: dict[str, list[float]] = {"engine": [], "hand_loop": [], "data": []}
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            trainer, _ = build_run(load_config(None, [*overrides, f"engine.out_dir={tmp}"], plan=False), verbose=False)
            trainer.val_loader = None  # nothing is evaluated: only training is timed
            peer = timm.create_model(args.model, img_size=args.img_size, patch_size=args.patch_size, num_classes=10)
            trainer.objective.model.load_state_dict(peer.state_dict(), strict=True)
            loader, augment = trainer.train_loader, trainer.train_transform

            measure = {
                "engine": partial(engine_rate, trainer, args.warmup, args.batch),
                "hand_loop": partial(hand_loop_rate, peer, loader, augment, r + 1, n, args.warmup, args.batch, amp,
                                     args.lr, args.weight_decay),
            }
            for key in ("engine", "hand_loop") if r % 2 == 0 else ("hand_loop", "engine"):
                rates[key].append(measure[key]())
            loader.set_epoch(r + 100)
            rates["data"].append(data_rate(loader, augment, n, args.warmup, args.batch))
        print(f"round {r}: engine {rates['engine'][-1]:.1f} img/s, hand loop {rates['hand_loop'][-1]:.1f} img/s, "
              f"data {rates['data'][-1]:.1f} img/s", flush=True)

    med = {k: statistics.median(v) for k, v in rates.items()}
    payload = {
        "benchmark": "training img/s: vitkit engine vs a hand-written loop around timm's model, same loader "
                     "and batch augmentation; and the data pipeline alone. Median over rounds.",
        "model": args.model,
        "model_args": {"img_size": args.img_size, "patch_size": args.patch_size, "num_classes": 10},
        "data": Path(args.data).name,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "amp": str(amp).replace("torch.", "") if amp is not None else "none",
        "optimizer": f"AdamW lr={args.lr} wd={args.weight_decay} (engine: fused, no decay on norms/biases; "
                     "hand loop: torch defaults on all parameters)",
        "num_workers": trainer.train_loader.num_workers,
        "engine_img_s": round(med["engine"], 2),
        "hand_loop_img_s": round(med["hand_loop"], 2),
        "ratio_engine_vs_hand": round(med["engine"] / med["hand_loop"], 4),
        "data_img_s": round(med["data"], 2),
        "data_vs_train_ratio": round(med["data"] / med["engine"], 3),
        "runs": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "machine": machine(),
        "versions": versions(vitkit, timm),
    }
    print(f"engine {payload['engine_img_s']} img/s, hand loop {payload['hand_loop_img_s']} img/s, "
          f"ratio {payload['ratio_engine_vs_hand']}; data {payload['data_img_s']} img/s "
          f"({payload['data_vs_train_ratio']}x training)", flush=True)
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
