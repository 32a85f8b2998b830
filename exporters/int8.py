"""Int8 deployment: the simulated W8A8 model, exported as QDQ ONNX.

``export_int8(model, int8_path, dataset, verify_inputs)`` runs the same
``quantize`` pass the study's sweeps measure (per-channel symmetric int8
weights, per-tensor uint8 activations calibrated on the dataset's training
images) and exports the result through :mod:`exporters.qdq`: the ONNX file
computes exactly what the simulated model computes, so the accuracy a user
reads in a sweep is the accuracy of the file they ship. On x86 CPUs uint8
activations run on ONNX Runtime's integer kernels (uint8 x int8 where that
is exact; uint8 x uint8 on x86 CPUs without VNNI, see :mod:`exporters.qdq`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["export_int8"]

log = logging.getLogger(__name__)


def export_int8(model, int8_path: str | Path, data, verify_inputs: tuple, *, example_inputs: tuple | None = None,
                calib_batches: int = 16, calib_method: str = "minmax", dynamic_batch: bool = True,
                min_top1: float = 0.0, wbits: int = 8, abits: int = 8, exclude: tuple[str, ...] = (),
                weight_type: str = "auto") -> dict[str, Any]:
    """Quantize the folded ``model`` (W8A8 by default) and write it to ``int8_path`` as verified QDQ ONNX.

    Calibrates on ``calib_batches`` seeded batches of ``data``'s training
    split (the same images as the sweeps, :func:`sntfx.compress.apply_pass`), exports the quantized model and checks
    the ONNX file's top-1 agreement with it on ``verify_inputs``: below
    ``min_top1`` nothing is written and :class:`~exporters.onnx_export.ExportError`
    is raised. Returns the export report (with ``integer_ops``), the
    calibration settings and the quantized torch model (``"model"``).
    """
    from sntfx.compress import apply_pass
    from sntfx.passes import SimulatedQuantize

    from .onnx_export import export_onnx

    p = SimulatedQuantize(wbits=wbits, abits=abits, act_method=calib_method, exclude=exclude)
    quantized = apply_pass(model, p, data, calib_batches=calib_batches).graph_module
    example = example_inputs or (verify_inputs[0][:1],)
    report = export_onnx(quantized, int8_path, example, dynamic_batch=dynamic_batch, verify_inputs=verify_inputs,
                         min_top1=min_top1, weight_type=weight_type)
    log.info("int8 model %s: %s", int8_path, report.integer_ops)
    return {"export": report.to_dict(), "verification": report.verification, "calibration_batches": calib_batches,
            "calibration_method": calib_method, "integer_ops": report.integer_ops,
            "qdq_weights": report.qdq_weights, "model": quantized}
