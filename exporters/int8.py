"""Int8 deployment: ONNX Runtime static quantization in QDQ format.

``quantize_int8(fp32_path, int8_path, reader)`` pre-processes the float model
(shape inference and graph optimisation), then quantizes it statically with
per-channel int8 weights and uint8 activations (QDQ format), calibrated on
the reader's batches (:class:`sntfx.calibration.CalibrationReader`). On x86
CPUs uint8 activations run several times faster than int8 ones (VNNI /
AVX2 u8s8 kernels).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["quantize_int8", "export_int8", "CALIBRATION_METHODS"]

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, reader, *, per_channel: bool = True,
                  method: str = "minmax") -> Path:
    """Write a QDQ int8 model to ``int8_path`` (not atomically: callers write to a temp dir)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method '{method}'; use {', '.join(CALIBRATION_METHODS)}")
    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}[method]
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        try:
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
            source = pre
        except Exception as exc:  # noqa: BLE001 - pre-processing is an optimisation
            log.warning("quantization pre-processing failed (%s); quantizing the model as exported", exc)
            source = Path(fp32_path)
        quantize_static(
            str(source),
            str(int8_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calib,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    return Path(int8_path)


def export_int8(fp32_path: str | Path, int8_path: str | Path, model, dataset, verify_inputs: tuple, *,
                calib_batches: int = 16, calib_method: str = "minmax", fixed_batch: int | None = None,
                min_top1: float = 0.0) -> dict[str, Any]:
    """Quantize the exported ``fp32_path`` to ``int8_path``, verified against ``model``, written atomically.

    Calibrates on ``calib_batches`` seeded batches of ``dataset`` (its
    training split), then checks the int8 model's top-1 agreement with
    ``model`` on ``verify_inputs``: below ``min_top1`` nothing is written and
    :class:`~exporters.onnx_export.ExportError` is raised. Returns the
    verification and the calibration settings (what ``sntfx export --int8``
    reports and the study records).
    """
    from sntfx.calibration import CalibrationReader

    from .onnx_export import ExportError, ort_session, verify_onnx

    int8_path = Path(int8_path)
    input_name = ort_session(fp32_path).get_inputs()[0].name
    reader = CalibrationReader(dataset, input_name, batches=calib_batches, fixed_batch=fixed_batch)
    with tempfile.TemporaryDirectory(dir=int8_path.parent, prefix=".sntfx-int8-") as tmp:
        tmp_int8 = Path(tmp) / int8_path.name
        quantize_int8(fp32_path, tmp_int8, reader, method=calib_method)
        check = verify_onnx(tmp_int8, model, verify_inputs, rtol=float("inf"), min_top1=min_top1)
        if not check["ok"]:
            raise ExportError(f"the int8 model disagrees with the float model: {check['reason']}; nothing was "
                              "written for it (try --calib-method percentile or more --calib-batches)")
        os.replace(tmp_int8, int8_path)
    return {"verification": check, "calibration_batches": len(reader), "calibration_method": calib_method}
