"""Export: ONNX checked with onnxruntime, torch.export, safetensors; the `vitkit export` command."""

import json

import pytest
import torch
from helpers import run_vitkit as vitkit

from vitkit import create_model
from vitkit.errors import ConfigError, PathNotFoundError
from vitkit.export import export, export_onnx, export_program
from vitkit.weights_io import save_weights


@pytest.mark.peer("onnx", "onnxscript", "onnxruntime")
@pytest.mark.parametrize("name", ["test_vit", "test_deit_distilled", "test_swin", "test_swinv2", "test_pvt_v2", "test_levit", "test_vim"])
def test_onnx_round_trip_matches_torch(name, tmp_path):
    model = create_model(name, num_classes=7).eval()
    result = export_onnx(model, tmp_path / f"{name}.onnx", dynamic_batch=True)
    assert result["ok"] and result["max_abs_diff"] <= 1e-4
    assert result["checked_batch"] == 3  # traced at 2: the batch really is dynamic
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32)
    (got,) = session.run(["logits"], {"images": x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), model(x), atol=1e-4)


def test_torch_export_program_round_trip(tmp_path):
    model = create_model("test_vit", num_classes=3).eval()
    result = export_program(model, tmp_path / "m.pt2", dynamic_batch=True)
    assert result["ok"] and result["max_abs_diff"] <= 1e-5
    program = torch.export.load(str(tmp_path / "m.pt2"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5)


def test_safetensors_reexport_rebuilds_the_same_model(tmp_path):
    model = create_model("test_deit_distilled", num_classes=4).eval()
    src = save_weights(model, tmp_path / "src" / "model.safetensors")
    result = export(src, "safetensors", tmp_path / "copy.safetensors")
    assert result["ok"] and result["max_abs_diff"] == 0.0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(create_model(str(tmp_path / "copy.safetensors")).eval()(x), model(x))
    with pytest.raises(ConfigError, match="format"):
        export(src, "tflite")
    with pytest.raises(ConfigError, match=".onnx"):
        export(src, "onnx", tmp_path / "wrong.bin")
    with pytest.raises(PathNotFoundError):
        export(tmp_path / "missing.safetensors", "onnx")


@pytest.mark.peer("onnx", "onnxscript", "onnxruntime")
def test_export_command_writes_and_checks_onnx(tmp_path):
    weights = save_weights(create_model("test_vit", num_classes=3).eval(), tmp_path / "model.safetensors")
    r = vitkit("export", weights, "--format", "onnx", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["path"] == str(tmp_path / "model.onnx") and (tmp_path / "model.onnx").is_file()
    assert result["ok"] and result["max_abs_diff"] <= 1e-4 and result["opset"] == 18


def test_export_command_bad_input_is_a_clear_error(tmp_path):
    r = vitkit("export", tmp_path / "nope.safetensors", "--format", "onnx")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "vitkit export: error:" in r.stderr and "nope.safetensors" in r.stderr
    weights = save_weights(create_model("test_vit").eval(), tmp_path / "model.safetensors")
    r = vitkit("export", weights, "--opset", "9")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "opset 9" in r.stderr
