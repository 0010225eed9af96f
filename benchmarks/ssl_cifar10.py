"""Self-supervised pretraining on CIFAR-10 without labels, then k-NN and linear probes on the test split.

Each method pretrains the same small ViT (the conv-stem nano ViT's sizes with a plain patch-8
embedding: 4x4 = 16 tokens at 32 px, so MAE's encoder truly never sees a masked pixel) on the
50,000 CIFAR-10 train images, labels unused, under a fixed wall-clock budget per method
(``engine.time_budget``, which bounds the whole run). Every method runs with its ``vitkit
pretrain`` defaults; the benchmark sets only the model, the image size, the batch size and
the budget. Then the exported backbone (DINO: the teacher; MAE: the encoder) is frozen and
probed: weighted k-NN (k=20, cosine, T=0.07) and a linear classifier, both fitted on the train
split's labels and scored on the 10,000 test images. A randomly initialised backbone is probed
the same way (``knn_random_init``).

    python benchmarks/ssl_cifar10.py                                  # 30 min per method
    python benchmarks/ssl_cifar10.py --budget 3m --out ssl_cifar10.json   # a short run

Writes ``benchmarks/results/<out>`` with ``knn_random_init``, ``knn_<method>``,
``linear_<method>``, ``budget_s`` and each run's summary.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml

from vitkit import save_weights
from vitkit.data import build_dataset, build_loader
from vitkit.engine.budget import parse_duration
from vitkit.models import create_model
from vitkit.predict import load_model
from vitkit.pretrain import METHODS, pretrain
from vitkit.probe import LinearProbeConfig, extract_features, knn_accuracy, linear_probe

from _common import machine, versions, write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = next((p / "shared" / "datasets" for p in REPO.parents if (p / "shared" / "datasets").is_dir()),
              REPO.parent / "shared" / "datasets")
DEFAULT_DATA = SHARED / "cifar10-jpg.tar.gz"
MODEL = "vit_nano_convstem_patch8_64"


class Spread:
    """Every ``len(ds) / n``-th image of a dataset (the class folders stay balanced), for a quicker probe."""

    def __init__(self, ds, n: int | None):
        self.ds = ds
        self.step = max(1, len(ds) // n) if n else 1
        self.n = len(ds) // self.step

    def __len__(self) -> int:
        return self.n

    def load(self, i: int):
        return self.ds.load(i * self.step)


def probe_features(weights: Path, data: str, workers: int, limits: dict) -> dict:
    """k-NN (k = 10, 20, 200) and linear-probe accuracy of the frozen backbone in ``weights``."""
    lm = load_model(weights, device="cpu")
    feats = {}
    for split in ("train", "val"):  # the tar's val split is its test/ folder
        ds = Spread(build_dataset(data, split, in_chans=lm.in_chans), limits[split])
        loader = build_loader(ds, 500, train=False, transform=lm.transform, num_workers=workers)
        feats[split] = extract_features(lm, loader)
    (xtr, ytr), (xte, yte) = feats["train"], feats["val"]
    n_cls = int(ytr.max()) + 1
    out = {"n_train": len(ytr), "n_test": len(yte), **knn_accuracy(xtr, ytr, xte, yte, n_cls)}
    out.update(linear_probe(xtr, ytr, xte, yte, n_cls, LinearProbeConfig()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="30m", help="wall-clock budget per method (30m, 3m, 90s)")
    ap.add_argument("--methods", default="mae,dino,simclr", help=f"comma-separated, of {','.join(METHODS)}")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every method")
    ap.add_argument("--run-root", default=None, help="where the runs go (default runs/ssl-cifar10-<time>)")
    ap.add_argument("--probe-train", type=int, default=None, help="probe with ~N train images (default: all 50k)")
    ap.add_argument("--probe-test", type=int, default=None, help="score on ~N test images (default: all 10k)")
    ap.add_argument("--model", default=MODEL, help="the backbone every method pretrains (and the random init)")
    ap.add_argument("--model-args", default="conv_stem=false", help="its model.args, comma-separated k=v")
    ap.add_argument("--out", default="ssl_cifar10.json")
    args = ap.parse_args()
    model_args = {k.strip(): yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.model_args.split(",")
                                                            if kv.strip())}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    limits = {"train": args.probe_train, "val": args.probe_test}
    budget_s = parse_duration(args.budget)
    root = Path(args.run_root or REPO / "runs" / f"ssl-cifar10-{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.time()
    result: dict = {
        "benchmark": "ssl_cifar10", "data": args.data, "model": args.model, "model_args": model_args, "img_size": 32,
        "batch_size": args.batch_size, "budget": args.budget, "budget_s": budget_s, "methods": methods,
        "probe": {"knn": "weighted k-NN, cosine, T=0.07, k=20 reported (10 and 200 in details)",
                  "linear": LinearProbeConfig().__dict__, "train_images": args.probe_train or "all", "test_images": args.probe_test or "all"},
        "machine": machine(), "versions": versions(), "load_start": os.getloadavg(), "runs": {},
    }

    torch.manual_seed(0)
    random_model = create_model(args.model, num_classes=0, img_size=32, **model_args)
    with tempfile.TemporaryDirectory() as tmp:
        w = save_weights(random_model, Path(tmp) / "random.safetensors")
        r = probe_features(w, args.data, args.workers, limits)
    result["knn_random_init"], result["linear_random_init"] = r["knn_acc_20"], r["linear_acc"]
    result["runs"]["random_init"] = r
    print(f"random init: k-NN {r['knn_acc_20']:.4f}, linear {r['linear_acc']:.4f}", flush=True)

    for method in methods:
        run = root / method
        overrides = [
            f"model.name={args.model}", *(f"model.args.{k}={v}" for k, v in model_args.items()), "data.img_size=32", f"data.batch_size={args.batch_size}",
            f"data.num_workers={args.workers}", f"engine.time_budget={args.budget}", "engine.epochs=1000",
            "engine.eval_every=1000", "objective.knn=false", "engine.tensorboard=false", f"engine.out_dir={run}",
            *args.set,
        ]
        t = time.time()
        summary = pretrain(method, args.data, overrides, verbose=False)
        pre_s = time.time() - t
        r = probe_features(run / "model.safetensors", args.data, args.workers, limits)
        result[f"knn_{method}"], result[f"linear_{method}"] = r["knn_acc_20"], r["linear_acc"]
        result["runs"][method] = {
            **r, "pretrain_wall_s": pre_s, "steps": summary["steps"], "epochs": summary["epochs"],
            "train_img_per_s": summary["train_img_per_s"], "stopped": summary["stopped"], "run_dir": str(run),
        }
        print(f"{method}: k-NN {r['knn_acc_20']:.4f}, linear {r['linear_acc']:.4f} after {summary['epochs']:.2f} "
              f"epochs in {pre_s:.0f} s", flush=True)
        write_json(args.out, {**result, "wall_s": time.time() - t0, "complete": False})

    result.update({"wall_s": time.time() - t0, "load_end": os.getloadavg(), "complete": True})
    path = write_json(args.out, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
