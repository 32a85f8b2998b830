"""Deployment: ONNX export verified against torch, int8 QDQ quantization, ONNX Runtime benchmarks.

* :func:`export_onnx` -- torch.export-based exporter with TorchScript fallback,
  checker, optional simplification, verification on ONNX Runtime.
* :func:`export_int8` -- the simulated W8A8 model (the ``quantize`` pass, as the
  sweeps measure it) written as QDQ ONNX; any model quantized by that pass
  exports in QDQ form (:mod:`.qdq`).
* :func:`bench_onnx` -- latency/throughput per batch size on TensorRT, CUDA or
  CPU, with provider-fallback detection.
"""

from .int8 import export_int8
from .onnx_export import ExportError, ExportReport, compare_arrays, export_onnx, ort_session, verify_onnx
from .ort_bench import BenchResult, bench_onnx, onnx_accuracy, resolve_providers

__all__ = [
    "export_onnx",
    "verify_onnx",
    "compare_arrays",
    "ExportError",
    "ExportReport",
    "export_int8",
    "ort_session",
    "bench_onnx",
    "onnx_accuracy",
    "resolve_providers",
    "BenchResult",
]
