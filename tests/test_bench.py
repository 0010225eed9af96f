"""`vitkit bench` and its library function: sane numbers on a tiny model, side by side with timm."""

import json

import pytest
import torch
from helpers import run_vitkit as vitkit

from vitkit import create_model
from vitkit.cli.bench import _int_list
from vitkit.efficient.bench import BenchConfig, bench, format_table
from vitkit.efficient.memory import peak_forward_bytes
from vitkit.errors import ConfigError
from vitkit.models.info import count_flops

FAST = dict(warmup=1, reps=3, threads=2)


def test_bench_rows_are_sane():
    result = bench("test_vit", BenchConfig(batches=(1, 4), precisions=("fp32", "bf16"), **FAST))
    rows = result["rows"]
    assert [(r["precision"], r["batch"]) for r in rows] == [("fp32", 1), ("fp32", 4), ("bf16", 1), ("bf16", 4)]
    with torch.device("meta"):
        flops = count_flops(create_model("test_vit"), (3, 32, 32)) / 1e9
    for r in rows:
        assert r["img_s"] > 0 and len(r["runs_img_s"]) == 3
        assert r["gflops_per_img"] == pytest.approx(flops, rel=1e-3)
        assert r["achieved_gflops_s"] == pytest.approx(r["gflops_per_img"] * r["img_s"], rel=1e-2)
        # The share of the measured matmul peak (itself load-dependent on a shared machine, so no upper bound).
        peak = result["matmul_peak_gflops_s"][r["precision"]]
        assert r["frac_of_matmul_peak"] == pytest.approx(r["achieved_gflops_s"] / peak, rel=1e-2)
        assert r["peak_mem_mb"] > 0
        if r["batch"] == 1:
            assert 0 < r["latency_ms_p50"] <= r["latency_ms_p95"]
        else:
            assert r["latency_ms_p50"] is None
    assert set(result["matmul_peak_gflops_s"]) == {"fp32", "bf16"}
    assert "img/s" in format_table(result)


def test_bench_tome_lowers_flops():
    plain = bench("test_vit", BenchConfig(batches=(2,), img_size=64, **FAST))
    merged = bench("test_vit", BenchConfig(batches=(2,), img_size=64, tome=16, **FAST))
    assert merged["rows"][0]["gflops_per_img"] < 0.85 * plain["rows"][0]["gflops_per_img"]
    assert merged["tome_r"] == 16


@pytest.mark.peer("timm")
def test_bench_vs_timm_side_by_side():
    result = bench("vit_tiny_patch16_224", BenchConfig(batches=(2,), img_size=32, vs_timm=True, **FAST))
    ours, theirs = result["rows"]
    assert (ours["impl"], theirs["impl"]) == ("vitkit", "timm")
    assert ours["ratio_vs_timm"] == pytest.approx(ours["img_s"] / theirs["img_s"], rel=1e-3)
    assert ours["gflops_per_img"] == pytest.approx(theirs["gflops_per_img"], rel=0.02)
    with pytest.raises(ConfigError, match="timm has no model"):
        bench("vit_nano_convstem_patch4_32", BenchConfig(batches=(1,), vs_timm=True, **FAST))


@pytest.mark.peer("timm")  # timm's Swin keeps its classifier as head.fc
def test_bench_vs_timm_loads_a_nested_timm_classifier():
    result = bench("swin_tiny_patch4_window7_224", BenchConfig(batches=(1,), vs_timm=True, **FAST))
    ours, theirs = result["rows"]
    assert ours["gflops_per_img"] == pytest.approx(theirs["gflops_per_img"], rel=0.02)


def test_peak_memory_counts_weights_and_live_activations():
    model = torch.nn.Linear(1024, 256)
    x = torch.randn(512, 1024)
    weights = (1024 * 256 + 256) * 4
    peak = peak_forward_bytes(model, x, lambda inp: model(inp))
    out_bytes = 512 * 256 * 4
    assert weights + out_bytes <= peak <= weights + 3 * out_bytes
    assert count_flops(model, x) == 2 * 512 * 1024 * 256


def test_bench_command_json_and_errors():
    r = vitkit("bench", "test_vit", "--batch", "1,2", "--precision", "fp32", "--reps", "2", "--warmup", "1",
               "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["model"] == "test_vit" and result["input_size"] == [3, 32, 32]
    assert [row["batch"] for row in result["rows"]] == [1, 2]
    assert all(row["img_s"] > 0 for row in result["rows"])
    r = vitkit("bench", "test_vit", "--precision", "fp8")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "vitkit bench: error:" in r.stderr, r.stderr
    r = vitkit("bench", "no_such_model")
    assert r.returncode == 2 and "unknown model" in r.stderr


def test_bench_bad_batches_are_config_errors():
    with pytest.raises(ConfigError, match="comma-separated"):
        _int_list("1,x")
    with pytest.raises(ConfigError, match="batch sizes"):
        bench("test_vit", BenchConfig(batches=(0,), **FAST))
