"""GPU checks on one CUDA device: inference speed against timm, and what token merging buys.

    python benchmarks/gpu/run.py [--out results/gpu_<name>.json] [--teacher-data CIFAR_TAR]

Sections, each a key of the JSON result:

- ``bench_vs_timm``: ``vitkit bench --vs timm`` for ViT-S/16 and Swin-T at batch 1 and 256,
  fp32 and bf16 (img/s, latency, peak memory, FLOPs, ratio to timm measured in the same run).
- ``tome_img_s``: ViT-S/16 at batch 256 in bf16 with ToMe at r = 8, 13 and 16 tokens per block,
  with and without proportional attention, beside the unmerged model.
- ``distill_img_s`` (with ``--teacher-data``): training img/s of a small student alone and under
  DeiT hard distillation from a ResNet-18 teacher, 500 steps each, the "alone" run twice to show
  the run-to-run spread.

The CNN-vs-ViT study has its own script: ``python benchmarks/cnn_vs_vit.py --device cuda``.
``results/gpu_h200.json`` holds one such run (H200, torch 2.11 + CUDA 13, timm 1.0.29).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # _common

import vitkit  # noqa: E402
from vitkit._peers import import_peer  # noqa: E402
from vitkit.efficient import apply_tome, remove_tome  # noqa: E402
from vitkit.efficient.bench import BenchConfig, bench  # noqa: E402

from _common import RESULTS, machine, versions, write_json  # noqa: E402

BENCH_MODELS = ("vit_small_patch16_224", "swin_tiny_patch4_window7_224")
TOME_R = (8, 13, 16)


def bench_vs_timm() -> dict:
    cfg = BenchConfig(batches=(1, 256), precisions=("fp32", "bf16"), vs_timm=True, device="cuda")
    return {name: bench(name, cfg) for name in BENCH_MODELS}


def _img_per_s(model: torch.nn.Module, x: torch.Tensor, reps: int = 15, warmup: int = 3) -> float:
    times = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for i in range(warmup + reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def tome_img_s() -> dict:
    model = vitkit.create_model("vit_small_patch16_224").eval().cuda()
    x = torch.randn(256, 3, 224, 224, device="cuda")
    out = {"r0": round(_img_per_s(model, x))}
    for r in TOME_R:
        for proportional in (True, False):
            apply_tome(model, r=r, proportional=proportional)
            out[f"r{r}_prop{int(proportional)}"] = round(_img_per_s(model, x))
            remove_tome(model)
    return out


def distill_img_s(data: str) -> dict:
    from vitkit.config import load_config
    from vitkit.train import train

    work = Path(tempfile.mkdtemp(prefix="vitkit-gpu-distill-"))
    teacher = vitkit.save_weights(vitkit.create_model("resnet18", num_classes=10, img_size=32),
                                  work / "teacher.safetensors")
    common = [f"data.path={data}", "engine.device=cuda", "data.num_workers=12", "engine.max_steps=500",
              "engine.time_budget=null", "engine.epochs=1000", "engine.eval_every=1000",
              "engine.tensorboard=false", "engine.plots=false", "model.name=vit_nano_convstem_patch4_32"]
    distill = ["objective.name=deit", "objective.distill_type=hard", f"objective.teacher={teacher}"]
    out = {}
    for name, extra in (("alone", []), ("distilled", distill), ("alone2", [])):
        cfg = load_config("cifar10_fast", [*common, *extra, f"engine.out_dir={work / name}"])
        cfg.model.args = {"conv_stem": False, "distilled": True, "global_pool": "token"}
        s = train(cfg, verbose=False, force=True)
        out[name] = {k: s[k] for k in ("steps", "train_img_per_s", "train_time_s", "wall_s")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="result file name under benchmarks/results (default: gpu_<device>.json)")
    p.add_argument("--teacher-data", help="CIFAR-10 (tar or folder) for the distillation section; skipped without")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu/run.py needs a CUDA device")
    timm = import_peer("timm")
    if timm is None:
        raise SystemExit("the side-by-side runs need timm: pip install -e '.[dev]'")
    gpu = torch.cuda.get_device_name(0)
    result = {"benchmark": "GPU checks (benchmarks/gpu/run.py)", "machine": machine(),
              "versions": versions(timm), "bench_vs_timm": bench_vs_timm(), "tome_img_s": tome_img_s()}
    if args.teacher_data:
        result["distill_img_s"] = distill_img_s(args.teacher_data)
    name = args.out or f"gpu_{gpu.split()[-1].lower()}.json"
    print(json.dumps(result["tome_img_s"]))
    print(f"wrote {write_json(name, result)} (results in {RESULTS})")


if __name__ == "__main__":
    main()
