"""Inference throughput of vitkit vs timm on the same architectures, in one process.

For each model and precision, both implementations get the same weights (timm's state
dict loads into vitkit unchanged) and the same input; timed calls alternate between the
two so that machine load drifts affect both alike. Writes results/throughput.json.

    python benchmarks/throughput.py                      # tiny, small, base; fp32 + bf16
    python benchmarks/throughput.py --models vit_tiny_patch16_224 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vitkit
from vitkit._peers import import_peer

from _common import machine, versions, write_json

MODELS = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"]


def bench_pair(name: str, precision: str, batch: int, reps: int, warmup: int, timm, device: str) -> dict:
    peer = timm.create_model(name).eval().to(device)
    ours = vitkit.create_model(name).eval().to(device)
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(batch, 3, 224, 224, device=device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def run(model):
        with torch.inference_mode(), autocast:
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode(), autocast:
        diff = (ours(x).float() - peer(x).float()).abs().max().item()
    for _ in range(warmup):
        run(ours)
        run(peer)
    rates = {"vitkit": [], "timm": []}
    for i in range(reps):
        order = [("vitkit", ours), ("timm", peer)] if i % 2 == 0 else [("timm", peer), ("vitkit", ours)]
        for key, model in order:
            t0 = time.perf_counter()
            run(model)
            rates[key].append(batch / (time.perf_counter() - t0))
    ours_med, peer_med = statistics.median(rates["vitkit"]), statistics.median(rates["timm"])
    return {
        "model": name,
        "precision": precision,
        "batch": batch,
        "vitkit_img_s": round(ours_med, 2),
        "timm_img_s": round(peer_med, 2),
        "ratio": round(ours_med / peer_med, 4),
        "vitkit_runs": [round(r, 2) for r in rates["vitkit"]],
        "timm_runs": [round(r, 2) for r in rates["timm"]],
        "max_abs_logit_diff": diff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--precisions", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="throughput.json")
    args = ap.parse_args()
    timm = import_peer("timm")
    if timm is None:
        raise SystemExit("the peer library is needed for the side-by-side run: pip install -e '.[dev]'")
    rows = []
    for name in args.models:
        for precision in args.precisions:
            row = bench_pair(name, precision, args.batch, args.reps, args.warmup, timm, args.device)
            print(f"{name:24s} {precision:5s} vitkit {row['vitkit_img_s']:8.1f} img/s  "
                  f"peer {row['timm_img_s']:8.1f} img/s  ratio {row['ratio']:.3f}", flush=True)
            rows.append(row)
    payload = {
        "benchmark": "inference throughput, img/s, median of reps after warm-up, calls alternating",
        "device": args.device,
        "machine": machine(),
        "versions": versions(vitkit, timm),
        "rows": rows,
        "min_ratio": min(r["ratio"] for r in rows),
    }
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
