"""Deployment: ONNX export verified against torch, int8 QDQ quantization, ONNX Runtime benchmarks.

* :func:`export_onnx` -- torch.export-based exporter with TorchScript fallback,
  checker, optional simplification, verification on ONNX Runtime.
* :func:`quantize_int8` -- static QDQ quantization (per-channel int8 weights,
  uint8 activations) calibrated on a dataset.
* :func:`bench_onnx` -- latency/throughput per batch size on TensorRT, CUDA or
  CPU, with provider-fallback detection.
"""

from .int8 import export_int8, quantize_int8
from .onnx_export import ExportError, ExportReport, compare_arrays, export_onnx, ort_session, verify_onnx
from .ort_bench import BenchResult, bench_onnx, onnx_accuracy, resolve_providers

__all__ = [
    "export_onnx",
    "verify_onnx",
    "compare_arrays",
    "ExportError",
    "ExportReport",
    "quantize_int8",
    "export_int8",
    "ort_session",
    "bench_onnx",
    "onnx_accuracy",
    "resolve_providers",
    "BenchResult",
]
