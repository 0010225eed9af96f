"""ToMe on a GPU: img/s of ViT-S/16 at 224 px, batch 256, bf16, for r in 8/13/16 with and without
proportional attention, then a torch.profiler table of three r=13 forwards."""

import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from vitkit import create_model
from vitkit.efficient import apply_tome, remove_tome

dev = "cuda"
m = create_model("vit_small_patch16_224").eval().to(dev)
x = torch.randn(256, 3, 224, 224, device=dev)


def rate(model, reps=15):
    ts = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for i in range(reps + 3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            torch.cuda.synchronize()
            if i >= 3:
                ts.append(time.perf_counter() - t0)
    return 256 / statistics.median(ts)


out = {"r0": rate(m)}
for r in (8, 13, 16):
    for prop in (True, False):
        apply_tome(m, r=r, proportional=prop)
        out[f"r{r}_prop{int(prop)}"] = rate(m)
        remove_tome(m)
print(json.dumps({k: round(v) for k, v in out.items()}))
apply_tome(m, r=13)
with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
    m(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            m(x)
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
