"""Export for deployment: ONNX (checked with onnxruntime), torch.export, safetensors; int8 quantization."""

from .onnx import FORMATS, ExportError, export, export_onnx, export_program, export_safetensors
from .quantize import quantize_int8

__all__ = ["FORMATS", "ExportError", "export", "export_onnx", "export_program", "export_safetensors", "quantize_int8"]
