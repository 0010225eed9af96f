"""How forward time and memory grow with image size: global attention (ViT) against windows
(Swin), spatial reduction (PVT v2) and a state-space scan (Vim).

For each model and resolution (one model built per resolution, so no position embedding is
resampled inside the timed call): forward time per image (median of ``--reps`` timed calls
after warm-up, at ``--batch``) and peak memory per image. The exponent is the least-squares
slope of log(time) against log(pixel count): 1 is linear in pixels, 2 quadratic.

Memory: on CUDA, the peak of ``torch.cuda.max_memory_allocated`` during one forward minus the
memory before it. On CPU, the peak resident set size during one forward minus the resident size
before it (Linux: the peak is reset through /proc/self/clear_refs and read as VmHWM; freed heap
is returned with malloc_trim first), so it counts activations, workspace and allocator slack.

In the same run, vitkit and timm are timed side by side (calls alternating) on the models both
have, with the same weights, at ``--timm-res``: ``vs_timm`` is vitkit img/s / timm img/s.
Writes results/scaling.json and results/scaling.png.

    python benchmarks/scaling.py                        # 4 models x 224/320/448/640, 5 reps
    python benchmarks/scaling.py --reps 2 --res 224 448 # a short run
    python benchmarks/scaling.py --clock cpu --threads 1 # on a busy shared CPU machine
"""

from __future__ import annotations

import argparse
import ctypes
import math
import re
import statistics
import time
from pathlib import Path

import torch

import vitkit
from vitkit._peers import import_peer
from vitkit.convert import load_weights

from _common import RESULTS, machine, versions, write_json

MODELS = {
    "vit_small_patch16_224": "ViT-S/16",
    "swin_tiny_patch4_window7_224": "Swin-T",
    "pvt_v2_b1": "PVT-v2-b1",
    "vim_tiny*": "Vim-tiny",
}
RESOLUTIONS = (224, 320, 448, 640)


def _resolve(pattern: str) -> str | None:
    found = vitkit.list_models(pattern)
    return found[0] if found else None


def _rss_kib(field: str) -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", status, re.M)
    return int(m.group(1)) if m else None


def peak_memory_mib(fn, device: str) -> float | None:
    """Peak extra memory (MiB) while ``fn()`` runs: CUDA allocator peak, or peak RSS on Linux."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    before = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    return None if before is None or peak is None else (peak - before) / 1024


# "wall": elapsed seconds. "cpu": CPU seconds this process used (all its threads), which other
# processes on a shared machine inflate far less than the wall clock; CPU runs only.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def _timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = _clock()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return _clock() - t0


def measure(name: str, res: int, batch: int, reps: int, warmup: int, device: str) -> dict:
    model = vitkit.create_model(name, img_size=res).eval().to(device)
    x = torch.randn(batch, 3, res, res, device=device)

    def run():
        with torch.inference_mode():
            model(x)

    for _ in range(warmup):
        run()
    times = [_timed(run, device) for _ in range(reps)]
    mem = peak_memory_mib(run, device)
    return {
        "resolution": res,
        "pixels": res * res,
        "ms_per_image": round(statistics.median(times) / batch * 1e3, 3),
        "runs_ms_per_image": [round(t / batch * 1e3, 3) for t in times],
        "peak_mem_mib_per_image": None if mem is None else round(mem / batch, 2),
    }


def fit_exponent(points: list[dict]) -> float | None:
    """Least-squares slope of log(time) on log(pixels)."""
    if len(points) < 2:
        return None
    xs = [math.log(p["pixels"]) for p in points]
    ys = [math.log(p["ms_per_image"]) for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def vs_timm(name: str, timm, res: int, batch: int, reps: int, warmup: int, device: str) -> dict:
    """vitkit / timm img/s on the same weights and input, timed calls alternating."""
    try:
        peer = timm.create_model(name, img_size=res)
    except TypeError:  # models without a fixed input size take no img_size
        peer = timm.create_model(name)
    peer = peer.eval().to(device)
    ours = vitkit.create_model(name, img_size=res).eval().to(device)
    load_weights(ours, peer.state_dict(), verbose=False)
    x = torch.randn(batch, 3, res, res, device=device)
    with torch.inference_mode():
        diff = (ours(x) - peer(x)).abs().max().item()
    runs = {"vitkit": [], "timm": []}

    def call(model):
        with torch.inference_mode():
            model(x)

    for _ in range(warmup):
        call(ours)
        call(peer)
    for i in range(reps):
        pairs = [("vitkit", ours), ("timm", peer)]
        for key, model in pairs if i % 2 == 0 else pairs[::-1]:
            runs[key].append(batch / _timed(lambda m=model: call(m), device))
    a, b = statistics.median(runs["vitkit"]), statistics.median(runs["timm"])
    return {"ratio": round(a / b, 4), "vitkit_img_s": round(a, 2), "timm_img_s": round(b, 2),
            "max_abs_logit_diff": diff, "resolution": res, "batch": batch}


def plot(models: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m in models.values():
        if not m.get("points"):
            continue
        px = [p["pixels"] for p in m["points"]]
        label = f"{m['label']} (exponent {m['exponent']:.2f})"
        axes[0].loglog(px, [p["ms_per_image"] for p in m["points"]], "o-", label=label)
        mem = [p["peak_mem_mib_per_image"] for p in m["points"]]
        if all(v is not None and v > 0 for v in mem):
            axes[1].loglog(px, mem, "o-", label=m["label"])
    ref = [224**2, 640**2]
    for ax, ylabel in zip(axes, ("forward time per image (ms)", "peak memory per image (MiB)")):
        ax.set_xlabel("pixels per image")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    lo = axes[0].get_ylim()[0]
    axes[0].loglog(ref, [lo * 1.5, lo * 1.5 * ref[1] / ref[0]], "k:", alpha=0.4, label="linear")
    axes[0].set_title("time vs image size (224-640 px)")
    axes[1].set_title("memory vs image size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--res", nargs="*", type=int, default=list(RESOLUTIONS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timm-res", type=int, default=224)
    ap.add_argument("--timm-batch", type=int, default=8)
    ap.add_argument("--timm-reps", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall: elapsed time; cpu: process CPU time (steadier on a shared CPU machine)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default="scaling.json")
    args = ap.parse_args()
    global _clock
    if args.clock == "cpu" and args.device == "cuda":
        raise SystemExit("--clock cpu measures CPU work; use the wall clock on a GPU")
    _clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    timm = import_peer("timm")
    models, missing, compare = {}, [], {}
    for pattern in args.models:
        label = MODELS.get(pattern, pattern)
        name = _resolve(pattern)
        if name is None:
            print(f"{label}: no registered model matches {pattern!r}; recorded as missing", flush=True)
            missing.append(pattern)
            models[label] = {"model": None, "missing": True, "exponent": None, "points": []}
            continue
        points = []
        for res in args.res:
            p = measure(name, res, args.batch, args.reps, args.warmup, args.device)
            print(f"{label:10s} {res:4d} px  {p['ms_per_image']:9.1f} ms/img  "
                  f"{p['peak_mem_mib_per_image']} MiB/img", flush=True)
            points.append(p)
        exp = fit_exponent(points)
        models[label] = {"model": name, "label": label, "exponent": None if exp is None else round(exp, 3),
                         "points": points}
        print(f"{label:10s} exponent {exp:.3f}", flush=True)
        if timm is not None and name in timm.list_models(name):
            compare[label] = vs_timm(name, timm, args.timm_res, args.timm_batch, args.timm_reps, args.warmup,
                                     args.device)
            print(f"{label:10s} vs timm {compare[label]['ratio']:.3f}", flush=True)
    plot_path = RESULTS / Path(args.out).with_suffix(".png").name
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(models, plot_path)
    payload = {
        "benchmark": f"forward time ({args.clock} clock) and peak memory per image vs resolution; exponent = slope of log time "
                     "on log pixels; vs_timm = vitkit img/s / timm img/s, same weights, calls alternating",
        "memory_measure": "CUDA: max_memory_allocated during one forward minus before; CPU: peak RSS (VmHWM "
                          "after a clear_refs reset, malloc_trim first) during one forward minus RSS before",
        "device": args.device,
        "clock": args.clock,
        "torch_threads": torch.get_num_threads(),
        "batch": args.batch,
        "reps": args.reps,
        "warmup": args.warmup,
        "resolutions": args.res,
        "timm_compare": {"resolution": args.timm_res, "batch": args.timm_batch, "reps": args.timm_reps},
        "machine": machine(),
        "versions": versions(vitkit, timm),
        "models": models,
        "missing": missing,
        "vs_timm": {k: v["ratio"] for k, v in compare.items()},
        "vs_timm_detail": compare,
        "plot": plot_path.name,
    }
    print("wrote", write_json(args.out, payload), "and", plot_path)


if __name__ == "__main__":
    main()
