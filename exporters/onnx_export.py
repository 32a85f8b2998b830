"""Export a (folded) model to ONNX, verified against torch on ONNX Runtime.

``export_onnx(model, path, example_inputs)``:

1. refuses a model that still holds SNT blocks unless ``allow_expanded``
   (deploying the expanded model defeats the purpose: fold it first);
2. exports with the ``torch.export``-based exporter (``dynamo=True``), falling
   back to the TorchScript exporter when that fails, and says which one ran;
3. writes one self-contained file below 2 GB and external data above;
4. runs ``onnx.checker`` and shape inference;
5. optionally simplifies the graph with onnxscript's optimizer;
6. runs the file on ONNX Runtime (CPU) and compares with torch on the
   verification inputs: max absolute and relative error and top-1 agreement.
   A model beyond tolerance is reported as failed and no file is written.

A model quantized by ``sntfx quantize`` (the ``quantize`` pass) is exported
in QDQ form (:mod:`exporters.qdq`): the file computes what the simulated
model computes, and ``integer_ops`` reports which operators ONNX Runtime
runs on integers. It is verified against the simulated model by top-1
agreement (``quantized_min_top1``): float rounding in a different order can
move a value across a rounding boundary of the next quantizer.
``weight_type`` chooses the weights' container (int8, or uint8 where ONNX
Runtime's int8 kernels would saturate; see :mod:`exporters.qdq`).

Everything is written to a temporary file first and renamed at the end.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sntfx.blocks import is_expanded
from sntfx.errors import DiskFullError, SntfxError
from sntfx.graph_utils import mode
from sntfx.io import is_disk_full
from sntfx.tracing import compare_outputs

__all__ = ["ExportError", "ExportReport", "export_onnx", "verify_onnx", "compare_arrays"]

log = logging.getLogger(__name__)

TWO_GB = 2 * 1024**3


class ExportError(SntfxError):
    """Export failed, or the exported model disagrees with torch."""


@dataclass
class ExportReport:
    path: str
    exporter: str  # "torch.export (dynamo)" | "torchscript"
    opset: int
    dynamic_batch: bool
    external_data: bool
    simplified: bool
    size_bytes: int
    seconds: float
    verification: dict[str, Any] = field(default_factory=dict)
    fallback_reason: str = ""
    quantized: bool = False  # exported in QDQ form from a model the quantize pass quantized
    integer_ops: dict[str, int] = field(default_factory=dict)  # operators ORT runs on integers (quantized only)
    qdq_weights: dict[str, int] = field(default_factory=dict)  # quantized layers by weight container (int8 / uint8)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_arrays(reference: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Max absolute error, norm-wise relative error and (for logits) top-1 agreement."""
    ref, out = np.asarray(reference, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if ref.shape != out.shape:
        return {"max_abs": float("inf"), "rel": float("inf"), "top1_agreement": 0.0}
    diff = np.abs(ref - out)
    result = {"max_abs": float(diff.max()) if diff.size else 0.0,
              "rel": compare_outputs(torch.from_numpy(ref), torch.from_numpy(out))}
    if ref.ndim == 2 and ref.shape[1] > 1:
        result["top1_agreement"] = float((ref.argmax(1) == out.argmax(1)).mean())
    return result


def ort_session(path: str | Path, providers=("CPUExecutionProvider",), *, profile_prefix: str | None = None):
    """An ONNX Runtime session for ``path`` with ORT's own logging quiet; a bad file is an :class:`ExportError`."""
    import onnxruntime as ort

    # ONNX Runtime's own log (provider probing, graph warnings) stays quiet unless sntfx runs with -v.
    ort.set_default_logger_severity(2 if log.isEnabledFor(logging.INFO) else 3)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if not Path(path).is_file():
        raise ExportError(f"'{path}' does not exist; give an .onnx file (e.g. from `sntfx export`)")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types for a bad file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"'{path}' is not an ONNX model that ONNX Runtime can load ({first}); give an .onnx "
                          "file written by `sntfx export` (a .pt model is exported first)") from exc


def verify_onnx(path: str | Path, model: nn.Module, inputs: tuple[torch.Tensor, ...], *, rtol: float = 1e-4,
                min_top1: float = 1.0) -> dict[str, Any]:
    """Run ``path`` on ONNX Runtime and compare with ``model`` (eval mode) on ``inputs``.

    Every sample of ``inputs`` is checked: a model exported with a fixed batch
    size runs them in batches of that size (the last one padded with copies
    of its first sample, whose outputs are dropped).
    """
    with mode(model, training=False), torch.no_grad():
        ref = model(*inputs)
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    sess = ort_session(path)
    names = [i.name for i in sess.get_inputs()]
    batch = sess.get_inputs()[0].shape[0]
    n = int(inputs[0].shape[0])
    if not isinstance(batch, int) or batch <= 0 or batch == n:
        outs = sess.run(None, {name: t.detach().cpu().numpy() for name, t in zip(names, inputs)})
    else:
        chunks = []
        for start in range(0, n, batch):
            part = [t[start:start + batch] for t in inputs]
            short = batch - part[0].shape[0]
            if short:
                part = [torch.cat([p, p[:1].expand(short, *p.shape[1:])]) for p in part]
            got = sess.run(None, {name: t.detach().cpu().numpy() for name, t in zip(names, part)})
            chunks.append([o[: batch - short] for o in got])
        outs = [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]
    if len(outs) != len(refs):
        return {"ok": False, "reason": f"ONNX model has {len(outs)} outputs, torch {len(refs)}"}
    worst: dict[str, Any] = {"max_abs": 0.0, "rel": 0.0}
    for r, o in zip(refs, outs):
        c = compare_arrays(r.detach().cpu().numpy(), o)
        worst["max_abs"] = max(worst["max_abs"], c["max_abs"])
        worst["rel"] = max(worst["rel"], c["rel"])
        if "top1_agreement" in c:
            worst["top1_agreement"] = min(worst.get("top1_agreement", 1.0), c["top1_agreement"])
    worst["samples"] = int(inputs[0].shape[0])
    worst["rtol"] = rtol
    worst["ok"] = worst["rel"] <= rtol and worst.get("top1_agreement", 1.0) >= min_top1
    if not worst["ok"]:
        worst["reason"] = (f"relative error {worst['rel']:.3g} (tolerance {rtol:g}), top-1 agreement "
                           f"{worst.get('top1_agreement', 1.0):.2%} (needed {min_top1:.0%})")
    return worst


def _export(model, inputs, path: Path, opset: int, dynamic_batch: bool) -> tuple[str, str]:
    """Export to ``path`` (may write external data beside it); returns (exporter, fallback reason)."""
    dyn_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        dyn_shapes = tuple({0: batch} for _ in inputs)
    try:
        program = torch.onnx.export(model, inputs, dynamo=True, opset_version=opset, dynamic_shapes=dyn_shapes,
                                    verbose=False, report=False)
        program.save(str(path), external_data=_needs_external(model))
        return "torch.export (dynamo)", ""
    except Exception as exc:  # noqa: BLE001 - any failure falls back to the TorchScript exporter
        _raise_if_disk_full(exc, path)
        reason = _reason(exc)
        log.warning("torch.export-based ONNX export failed (%s); falling back to the TorchScript exporter", reason)
    names = [f"input_{i}" for i in range(len(inputs))] if len(inputs) > 1 else ["input"]
    axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
    if axes is not None:
        axes["output"] = {0: "batch"}
    try:
        torch.onnx.export(model, inputs, str(path), dynamo=False, opset_version=opset, input_names=names,
                          output_names=["output"], dynamic_axes=axes)
    except Exception as exc:  # noqa: BLE001
        _raise_if_disk_full(exc, path)
        raise ExportError(
            f"both ONNX exporters failed. torch.export: {reason}. TorchScript: {_reason(exc)}. Replace the "
            "unsupported operation, or keep it out of the exported part of the model."
        ) from exc
    return "torchscript", reason


def _raise_if_disk_full(exc: BaseException, path: Path) -> None:
    if is_disk_full(exc):
        raise DiskFullError(f"cannot write '{path.name}': no space left on its device (or over a quota); nothing "
                            "was written. Free some space or choose another output location") from exc


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _reason(exc: BaseException) -> str:
    """The most telling line of an exporter's error (unsupported op first), without colour codes."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    telling = next((ln for ln in lines if "unsupported" in ln.lower() or "aten::" in ln or "aten." in ln), None)
    return f"{type(exc).__name__}: {(telling or (lines[0] if lines else ''))[:300]}"


def _needs_external(model: nn.Module) -> bool:
    return sum(p.numel() * p.element_size() for p in model.parameters()) > TWO_GB * 0.95


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor,
    *,
    opset: int = 18,
    dynamic_batch: bool = False,
    allow_expanded: bool = False,
    simplify: bool = False,
    verify_inputs: tuple[torch.Tensor, ...] | None = None,
    rtol: float = 1e-4,
    min_top1: float = 1.0,
    quantized_min_top1: float = 0.95,
    weight_type: str = "auto",
) -> ExportReport:
    """Export ``model`` to ``path`` and verify it; see the module docstring.

    Example::

        report = export_onnx(sntfx.load("folded.pt"), "model.onnx", torch.randn(1, 3, 32, 32), dynamic_batch=True)
    """
    import onnx

    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not allow_expanded and is_expanded(model):
        raise ExportError(
            "the model still holds SNT blocks (its expanded training form); deploying it defeats the purpose. "
            "Fold it first (`sntfx fold` / sntfx.fold), or pass --allow-expanded to export it anyway."
        )
    path = Path(path)
    if not path.parent.is_dir():
        raise ExportError(f"output folder '{path.parent}' does not exist")
    from .qdq import integer_ops, is_quantized, qdq_form

    model = model.eval()
    quantized = is_quantized(model)
    target = qdq_form(model, weight_type).eval() if quantized else model
    if quantized:
        rtol, min_top1 = float("inf"), quantized_min_top1
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".sntfx-export-") as tmp:
            tmp_path = Path(tmp) / path.name
            exporter, fallback = _export(target, inputs, tmp_path, opset, dynamic_batch)
            simplified = _simplify(tmp_path) if simplify else False
            try:
                onnx.checker.check_model(str(tmp_path), full_check=True)
            except Exception as exc:  # noqa: BLE001
                raise ExportError(f"the exported model fails onnx.checker: {exc}") from exc
            vin = verify_inputs if verify_inputs is not None else inputs
            vin = (vin,) if isinstance(vin, torch.Tensor) else tuple(vin)
            verification = verify_onnx(tmp_path, model, vin, rtol=rtol, min_top1=min_top1)
            if not verification["ok"]:
                raise ExportError(f"the ONNX model disagrees with torch: {verification.get('reason')}; nothing was written")
            int_ops = integer_ops(tmp_path) if quantized else {}
            external = any(p.name != path.name for p in Path(tmp).iterdir())
            size = sum(p.stat().st_size for p in Path(tmp).iterdir())
            for p in Path(tmp).iterdir():
                os.replace(p, path.parent / p.name)
    except DiskFullError:
        raise
    except Exception as exc:  # noqa: BLE001 - a full disk may surface from any of the writers above
        _raise_if_disk_full(exc, path)
        raise
    return ExportReport(str(path), exporter, opset, dynamic_batch, external, simplified, size,
                        time.perf_counter() - start, verification, fallback, quantized, int_ops,
                        dict(target.meta["sntfx"]["qdq_weights"]) if quantized else {})


def _simplify(path: Path) -> bool:
    """onnxscript's optimizer (constant folding, dead code removal); True only if it changed the graph."""
    import onnx
    import onnxscript.optimizer

    model = onnx.load(str(path))
    before = model.graph.SerializeToString(deterministic=True)
    optimized = onnxscript.optimizer.optimize(model)
    if optimized.graph.SerializeToString(deterministic=True) == before:
        return False
    onnx.save(optimized, str(path))
    return True
