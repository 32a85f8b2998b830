"""QDQ export of a model quantized by sntfx: deploy exactly what was measured.

``sntfx quantize`` (the ``quantize`` pass, :class:`sntfx.passes.SimulatedQuantize`)
leaves a torch model whose conv/linear weights sit on their integer grid and
whose quantized activations pass through calibrated
:class:`~sntfx.quant.ActQuant` modules. :func:`qdq_form` returns a copy of
that model that computes the same function with torch's quantize /
dequantize operators (``torch.ops.quantized_decomposed``, which the
``torch.export``-based ONNX exporter writes as ``QuantizeLinear`` /
``DequantizeLinear``):

* a weight on a ``b``-bit grid (``|k| <= 2**(b-1) - 1`` steps of its scale)
  is stored as its step counts and a ``DequantizeLinear`` with the same
  scale, per output channel or per tensor: int8 counts (zero point 0), or
  the same counts plus 128 in a uint8 container (zero point 128), see
  ``weight_type`` below;
* an activation quantizer becomes ``QuantizeLinear`` / ``DequantizeLinear``
  with its calibrated scale and zero point in a uint8 container; below 8
  bits a ``Clip`` of the dequantized values to the ``2**b`` levels follows,
  which is exactly the narrower grid (ONNX Runtime has no integer kernel for
  it and computes those layers in float).

ONNX Runtime then runs the quantized layers on integer kernels where its
QDQ fusions apply (e.g. ``QLinearConv`` for a convolution whose input,
weight and output are quantized); :func:`integer_ops` counts them in the
graph ONNX Runtime actually executes.

**The weight container (``weight_type``).** On x86 CPUs without VNNI
(AVX2 only), ONNX Runtime's uint8 x int8 kernels add pairs of products in
16 bits, which saturates when two large activations meet two large weights
(``255 * 127 * 2 > 32767``): the file then computes something other than the
model that was measured (on a small CNN, W8A8: 14% relative error and 8% of
top-1 predictions changed; with uint8 weights 0.2% and none). ``"uint8"``
stores the weights of every layer on an 8-bit grid as uint8 with
zero point 128, which ONNX Runtime runs on its uint8 x uint8 kernels (no
saturation; about 1.4x slower than uint8 x int8 on such a CPU); ``"int8"``
keeps int8 weights (exact on ARM, on x86 with VNNI and on GPUs, and what
TensorRT requires); ``"auto"`` (the default) chooses ``"uint8"`` on an x86
CPU without VNNI and ``"int8"`` elsewhere. Grids of 7 bits or less
(``|k| <= 63``, ``2 * 255 * 63 <= 32767``: ONNX Runtime's own ``reduce_range``)
cannot saturate and stay int8 either way.
"""

from __future__ import annotations

import copy
import functools
import logging
import platform
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from sntfx.blocks.base import LayerConfig
from sntfx.errors import SntfxError
from sntfx.quant import ActQuant, weight_grid_scale

__all__ = ["is_quantized", "qdq_form", "integer_ops", "INTEGER_OPS", "WEIGHT_TYPES", "resolve_weight_type",
           "int8_kernels_may_saturate"]

log = logging.getLogger(__name__)

#: ONNX Runtime operators that compute on integers.
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "MatMulIntegerToFloat",
               "QLinearAdd", "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat",
               "QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax", "DynamicQuantizeMatMul")


WEIGHT_TYPES = ("auto", "int8", "uint8")
#: Weight grids that can saturate ONNX Runtime's uint8 x int8 kernels without VNNI (``2 * 255 * |k| > 32767``).
SATURATING_BITS = 8


@functools.lru_cache(maxsize=1)
def int8_kernels_may_saturate() -> bool:
    """True on an x86 CPU without VNNI, where ONNX Runtime's uint8 x int8 kernels add products in 16 bits."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i386", "i686"):
        return False
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: no way to tell here, so stay exact
        return True
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def resolve_weight_type(weight_type: str) -> str:
    """``"int8"`` or ``"uint8"`` for a ``weight_type`` of :data:`WEIGHT_TYPES` (``"auto"``: see the module docstring)."""
    if weight_type not in WEIGHT_TYPES:
        raise SntfxError(f"weight type must be one of {', '.join(WEIGHT_TYPES)}, not '{weight_type}'")
    if weight_type == "auto":
        return "uint8" if int8_kernels_may_saturate() else "int8"
    return weight_type


def quantized_layers(gm: nn.Module) -> dict[str, dict]:
    """``{layer name: {"bits": b, "per_channel": bool}}`` for layers whose weights the quantize pass put on a grid."""
    meta = getattr(gm, "meta", None)
    return dict(meta.get("sntfx", {}).get("quantized_weights", {})) if isinstance(meta, dict) else {}


def is_quantized(gm: nn.Module) -> bool:
    """True when ``gm`` holds quantized weights or activation quantizers from the quantize pass."""
    return bool(quantized_layers(gm)) or any(isinstance(m, ActQuant) for m in gm.modules())


def _ops():
    """``torch.ops.quantized_decomposed`` (registered by importing its module)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers torch.ops.quantized_decomposed

    return torch.ops.quantized_decomposed


class _QDQWeightLayer(nn.Module):
    """A conv/linear layer computing with ``DequantizeLinear(weight)``: int8 counts, or uint8 counts + 128."""

    def __init__(self, layer: nn.Module, scale: torch.Tensor, per_channel: bool, unsigned: bool = False):
        super().__init__()
        self.config, self.per_channel = LayerConfig.from_module(layer), per_channel
        self.offset = 128 if unsigned else 0
        self.low, self.high, self.dtype = (0, 255, torch.uint8) if unsigned else (-128, 127, torch.int8)
        with torch.no_grad():
            steps = torch.round(layer.weight / scale).clamp(-127, 127) + self.offset
        self.register_buffer("weight_q", steps.to(self.dtype))
        self.register_buffer("scale", scale.reshape(-1).float() if per_channel else scale.reshape(()).float())
        self.register_buffer("zero_point", torch.full((self.scale.numel(),), self.offset, dtype=torch.int64))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = _ops()
        if self.per_channel:
            w = qd.dequantize_per_channel(self.weight_q, self.scale, self.zero_point, 0, self.low, self.high,
                                          self.dtype)
        else:
            w = qd.dequantize_per_tensor(self.weight_q, float(self.scale), self.offset, self.low, self.high,
                                         self.dtype)
        return self.config.apply(x, w, self.bias)


class _QDQActivation(nn.Module):
    """An :class:`ActQuant` as QuantizeLinear / DequantizeLinear (uint8; then a Clip below 8 bits)."""

    def __init__(self, q: ActQuant):
        super().__init__()
        if q.calibrating:
            raise SntfxError("an activation quantizer is still calibrating; finish calibration before exporting")
        self.scale, self.zero_point, self.levels = float(q.scale), int(round(float(q.zero_point))), q.levels
        self.low, self.high = (0 - self.zero_point) * self.scale, (self.levels - self.zero_point) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = _ops()
        q = qd.quantize_per_tensor(x, self.scale, self.zero_point, 0, 255, torch.uint8)
        y = qd.dequantize_per_tensor(q, self.scale, self.zero_point, 0, 255, torch.uint8)
        # The exporter writes QuantizeLinear's full uint8 range: clip the dequantized values to the 2**b - 1
        # levels (the same as clipping the integers). Clipping before QuantizeLinear would be the same function,
        # but ONNX Runtime's Clip/QuantizeLinear fusion drops such a Clip.
        return torch.clamp(y, self.low, self.high) if self.levels < 255 else y


def qdq_form(gm: fx.GraphModule, weight_type: str = "auto") -> fx.GraphModule:
    """A copy of the quantized ``gm`` that exports to QDQ ONNX and computes the same function.

    ``weight_type`` (:data:`WEIGHT_TYPES`) says how weights on 8-bit grids
    are stored (see the module docstring); the copy's ``meta["sntfx"]
    ["qdq_weights"]`` counts the layers stored each way.

    BatchNorms after quantized layers are folded into them first (exact; a
    per-channel grid scaled per channel is still a per-channel grid), so that
    ONNX Runtime sees ``DQ -> Conv -> Relu -> Q`` and can fuse it into an
    integer kernel. Raises :class:`SntfxError` when a layer's weight is not
    on the grid the quantize pass put it on (the model was changed
    afterwards, or a per-tensor grid met a BatchNorm).
    """
    from sntfx.pass_manager import PassManager
    from sntfx.passes import FoldBatchNorm

    _ops()  # registered before the exporter builds its operator table
    unsigned_wide = resolve_weight_type(weight_type) == "uint8"
    out = copy.deepcopy(gm)
    for p in out.parameters():  # an inference graph: no autograd variants of the quantize operators
        p.requires_grad_(False)
    PassManager([FoldBatchNorm()]).run(out, inplace=True)
    containers: Counter = Counter()
    for name, spec in quantized_layers(gm).items():
        try:
            layer = out.get_submodule(name)
        except AttributeError:
            raise SntfxError(f"layer '{name}' was quantized but is no longer in the model; quantize the model as "
                             "the last compression step") from None
        bits, per_channel = int(spec["bits"]), bool(spec.get("per_channel", True))
        with torch.no_grad():
            scale = weight_grid_scale(layer.weight, bits, per_channel=per_channel)
            steps = layer.weight / scale
            off_grid = float((steps - steps.round()).abs().max()) if steps.numel() else 0.0
            beyond = float(steps.abs().max()) > 2 ** (bits - 1) - 1 + 1e-3 if steps.numel() else False
        if off_grid > 1e-3 or beyond:
            raise SntfxError(f"the weights of '{name}' are no longer on their {bits}-bit grid (largest distance "
                             f"{off_grid:.3g} steps): the model was changed after `sntfx quantize`, or a per-tensor "
                             "grid met a BatchNorm. Quantize last (after pruning and fine-tuning), and fold "
                             "BatchNorms first (`sntfx fold --batchnorm`) when quantizing per tensor")
        unsigned = unsigned_wide and bits >= SATURATING_BITS
        containers["uint8" if unsigned else "int8"] += 1
        out.set_submodule(name, _QDQWeightLayer(layer, scale, per_channel, unsigned))
    for name, m in list(out.named_modules()):
        if isinstance(m, ActQuant):
            out.set_submodule(name, _QDQActivation(m))
    out.meta.setdefault("sntfx", {})["qdq_weights"] = dict(containers)
    return out


def integer_ops(path: str | Path) -> dict[str, int]:
    """Operators of the graph ONNX Runtime (CPU) executes for ``path`` after its QDQ fusions, by type.

    Returns the counts of :data:`INTEGER_OPS` found and ``"total"`` (every
    node), so callers can report how much of the model runs on integers.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="sntfx-ortopt-") as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
        ops = Counter(n.op_type for n in graph.node)
    found = {op: ops[op] for op in INTEGER_OPS if ops.get(op)}
    found["total"] = sum(ops.values())
    return found
