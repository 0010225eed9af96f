"""`bench(model)`: inference speed, latency, memory and FLOP efficiency, optionally against timm.

For each precision and batch size: img/s (median of timed calls after warm-up), latency p50 and
p95 at batch 1, peak memory of one forward, GFLOPs per image (counted op by op, so token merging
shows), and the achieved FLOP/s as a share of this machine's measured matmul peak in that
precision. With ``vs_timm`` the same architecture from timm gets the same weights and input in the
same process, timed calls alternating between the two so that load drifts hit both alike.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..engine.runtime import resolve_device
from ..errors import ConfigError
from ..models.info import count_flops
from ..source import load_model
from .compile import compile_for_inference
from .memory import peak_forward_bytes
from .precision import PRECISIONS, autocast
from .tome import apply_tome


@dataclass
class BenchConfig:
    batches: Sequence[int] = (1, 32)
    img_size: int | None = None
    precisions: Sequence[str] = ("fp32",)
    tome: int | None = None
    compile: bool = False
    vs_timm: bool = False
    warmup: int = 3
    reps: int = 10
    device: str | None = None
    threads: int | None = None


@dataclass
class BenchRow:
    impl: str
    precision: str
    batch: int
    img_s: float
    runs_img_s: list[float]
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    peak_mem_mb: float
    gflops_per_img: float
    achieved_gflops_s: float
    frac_of_matmul_peak: float
    ratio_vs_timm: float | None = None
    notes: list[str] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(precision: str, device: torch.device, n: int | None = None, reps: int = 5) -> float:
    """FLOP/s of a square matmul in ``precision`` on ``device``: the best of ``reps`` timed calls."""
    n = n or (4096 if device.type == "cuda" else 1024)
    dtype = PRECISIONS[precision] or torch.float32
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if i:  # the first call warms up
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _load(model: str | nn.Module, img_size: int | None) -> nn.Module:
    """A model object as is; any other source through ``load_model`` (a run directory or weights file
    runs at any input size, the position embedding resampled; a registered name gets random weights)."""
    if isinstance(model, nn.Module):
        return model
    return load_model(model, device="cpu", pretrained=False, img_size=img_size).model


def _timm_key(key: str, theirs: set[str]) -> str:
    nested = "head.fc." + key[len("head."):]
    return nested if key not in theirs and key.startswith("head.") and nested in theirs else key


def _timm_twin(model: nn.Module, img_size: tuple[int, int]) -> nn.Module:
    """The same architecture from timm, holding ``model``'s weights."""
    from .._peers import import_peer

    timm = import_peer("timm")
    if timm is None:
        raise ConfigError("--vs timm needs timm: pip install 'vitkit[peers]'")
    name = getattr(model, "model_name", None)
    if not name or name not in timm.list_models():
        raise ConfigError(f"timm has no model named {name!r}; --vs timm compares models that both libraries register")
    try:
        peer = timm.create_model(name, pretrained=False, num_classes=model.num_classes, img_size=img_size)
        theirs = set(peer.state_dict())
        # Names are shared, except a classifier that timm nests as ``head.fc`` (Swin).
        peer.load_state_dict({_timm_key(k, theirs): v for k, v in model.state_dict().items()}, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"timm's {name} does not have this model's layout ({str(e)[:200]}); cannot compare") from None
    return peer


def _time_calls(impls: dict[str, nn.Module], x: torch.Tensor, precision: str, warmup: int, reps: int):
    """Seconds per call for each implementation, calls alternating between them."""

    def call(m: nn.Module) -> None:
        with torch.inference_mode(), autocast(precision, x.device):
            m(x)
        _sync(x.device)

    for _ in range(warmup):
        for m in impls.values():
            call(m)
    times: dict[str, list[float]] = {k: [] for k in impls}
    keys = list(impls)
    for i in range(reps):
        for k in keys if i % 2 == 0 else keys[::-1]:
            t0 = time.perf_counter()
            call(impls[k])
            times[k].append(time.perf_counter() - t0)
    return times


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def bench(model: str | nn.Module, config: BenchConfig | None = None) -> dict:
    """Benchmark a registered model name, a run directory / weights file, or a model object."""
    cfg = config or BenchConfig()
    bad = [p for p in cfg.precisions if p not in PRECISIONS]
    if bad:
        raise ConfigError(f"precision {bad[0]!r} must be one of {sorted(PRECISIONS)}")
    if not cfg.batches or min(cfg.batches) < 1:
        raise ConfigError(f"batch sizes must be >= 1, got {list(cfg.batches)}")
    if cfg.reps < 1 or cfg.warmup < 0:
        raise ConfigError(f"reps must be >= 1 and warmup >= 0, got {cfg.reps} and {cfg.warmup}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    net = _load(model, cfg.img_size).eval()
    c, h, w = net.card.input_size if hasattr(net, "card") else (3, cfg.img_size or 224, cfg.img_size or 224)
    if cfg.img_size:
        h = w = cfg.img_size
    for p in cfg.precisions:
        autocast(p, device)  # refuses fp16 on a CPU before anything runs
    peer = _timm_twin(net, (h, w)).eval().to(device) if cfg.vs_timm else None
    notes = []
    if cfg.tome:
        apply_tome(net, r=cfg.tome)
        notes.append(f"vitkit with ToMe r={cfg.tome}; the timm model without" if peer is not None else f"ToMe r={cfg.tome}")
    net = net.to(device)
    x1 = torch.randn(1, c, h, w, device=device)
    gflops = {"vitkit": count_flops(net, x1) / 1e9}
    if peer is not None:
        gflops["timm"] = count_flops(peer, x1) / 1e9
    runner = net
    compiled = None
    if cfg.compile:
        compiled = compile_for_inference(net, x1)
        runner = compiled.model
        notes.append("compiled" if compiled.compiled else f"torch.compile failed, eager: {compiled.reason}")
    peaks = {p: matmul_peak_flops(p, device) for p in cfg.precisions}
    rows: list[BenchRow] = []
    for precision in cfg.precisions:
        for batch in cfg.batches:
            x = torch.randn(batch, c, h, w, device=device)
            impls = {"vitkit": runner} if peer is None else {"vitkit": runner, "timm": peer}
            times = _time_calls(impls, x, precision, cfg.warmup, cfg.reps)
            eager = {"vitkit": net, "timm": peer}
            for name, ts in times.items():
                img_s = statistics.median(batch / t for t in ts)

                def once(inp, m=eager[name], precision=precision):
                    with torch.inference_mode(), autocast(precision, device):
                        m(inp)

                mem = peak_forward_bytes(eager[name], x, once)
                rows.append(BenchRow(
                    impl=name, precision=precision, batch=batch, img_s=round(img_s, 2),
                    runs_img_s=[round(batch / t, 2) for t in ts],
                    latency_ms_p50=round(_percentile(ts, 0.5) * 1e3, 3) if batch == 1 else None,
                    latency_ms_p95=round(_percentile(ts, 0.95) * 1e3, 3) if batch == 1 else None,
                    peak_mem_mb=round(mem / 2**20, 2),
                    gflops_per_img=float(f"{gflops[name]:.6g}"),
                    achieved_gflops_s=float(f"{gflops[name] * img_s:.6g}"),
                    frac_of_matmul_peak=float(f"{gflops[name] * 1e9 * img_s / peaks[precision]:.4g}"),
                ))
            if peer is not None:
                ours, theirs = rows[-2], rows[-1]
                ours.ratio_vs_timm = round(ours.img_s / theirs.img_s, 4)
    return {
        "model": getattr(net, "model_name", type(net).__name__),
        "device": str(device),
        "input_size": [c, h, w],
        "tome_r": cfg.tome,
        "compiled": None if compiled is None else compiled.compiled,
        "config": asdict(cfg) | {"batches": list(cfg.batches), "precisions": list(cfg.precisions)},
        "matmul_peak_gflops_s": {p: round(v / 1e9, 2) for p, v in peaks.items()},
        "notes": notes,
        "machine": {
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "rows": [asdict(r) for r in rows],
    }


def format_table(result: dict) -> str:
    """The rows of :func:`bench` as a text table."""
    head = (f"{result['model']} on {result['device']}, input {'x'.join(map(str, result['input_size']))}; "
            f"matmul peak " + ", ".join(f"{p} {v:.1f} GFLOP/s" for p, v in result["matmul_peak_gflops_s"].items()))
    lines = [head] + [f"  note: {n}" for n in result["notes"]]
    cols = (f"{'impl':7s} {'prec':5s} {'batch':>5s} {'img/s':>10s} {'p50 ms':>8s} {'p95 ms':>8s} "
            f"{'peak MB':>9s} {'GFLOPs':>8s} {'% peak':>7s} {'vs timm':>8s}")
    lines += [cols, "-" * len(cols)]
    for r in result["rows"]:
        def opt(v, fmt):
            return format(v, fmt) if v is not None else "-"

        lines.append(
            f"{r['impl']:7s} {r['precision']:5s} {r['batch']:>5d} {r['img_s']:>10.1f} {opt(r['latency_ms_p50'], '8.2f'):>8s} "
            f"{opt(r['latency_ms_p95'], '8.2f'):>8s} {r['peak_mem_mb']:>9.1f} {r['gflops_per_img']:>8.3f} "
            f"{100 * r['frac_of_matmul_peak']:>6.1f}% {opt(r['ratio_vs_timm'], '8.3f'):>8s}"
        )
    return "\n".join(lines)
