"""``quantize``: simulated post-training quantization of weights and activations.

Weights of every conv/linear layer are replaced by their quantize-dequantize
values (``wbits`` in 2..8, symmetric, per channel or per tensor, ``rtn`` or
``mse`` clipping; see :mod:`sntfx.quant`). With ``abits``, activations are
quantized by :class:`~sntfx.quant.ActQuant` modules calibrated on
``ctx.calibration`` (batches of real inputs)::

    %y = call_module[target=conv](%x)
      ->
    %xq = call_module[target=sntfx_actq_0](%x)      # ActQuant, calibrated
    %y  = call_module[target=conv](%xq)

Where they go (``scheme``):

* ``qdq`` (default): the placement ONNX Runtime's QDQ kernels need. BatchNorms
  after conv/linear layers are folded first (exact), then every tensor that
  enters a quantized layer or either operand of an addition (a residual sum)
  gets one quantizer, shared by all its quantized users. A deployed
  ``conv -> relu -> conv`` or ``conv + shortcut`` then runs on integer
  kernels (``QLinearConv``, ``QLinearAdd``).
* ``layer-inputs``: one quantizer in front of each quantized layer, BatchNorms
  left alone (what files saved before ``scheme`` existed hold).

The result is still a torch model (its accuracy can be measured, it saves
and loads), and it is what is deployed: the quantized layers are recorded in
``sntfx_meta(gm)["quantized_weights"]``, from which ``sntfx export`` writes
the same function as a QDQ ONNX model (:mod:`sntfx.exporters.qdq`).
``info["layers"]`` reports, per layer, the relative weight quantization
error and, with activations, the relative error of the quantized input on
the calibration data.

Requires: ``folded``. Numerics: changes the function.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx as fx

from sntfx.compress_utils import LayerSelection
from sntfx.pass_base import Numerics, Pass, PassContext, PassResult, Property, register_pass
from sntfx.quant import ACT_METHODS, ActQuant, fake_quant_weight
from sntfx.tracing import sntfx_meta

__all__ = ["SimulatedQuantize"]


def _check_bits(bits, what: str, low: int = 2) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= 8:
        raise ValueError(f"{what} must be an integer from {low} to 8, got {bits!r}")


@register_pass
class SimulatedQuantize(LayerSelection, Pass):
    """Fake-quantize weights (and optionally activations) of conv/linear layers."""

    name = "quantize"
    requires = frozenset({Property.FOLDED})
    needs_eval = True  # calibration runs the model; BatchNorms must use their running statistics

    #: What a recipe saved before a parameter existed meant (see :func:`sntfx.serialization.load`).
    legacy_params = {"scheme": "layer-inputs"}

    def __init__(self, wbits: int = 8, abits: int | None = None, granularity: str = "channel", method: str = "rtn",
                 act_method: str = "minmax", exclude_first: bool = False, exclude_last: bool = False, exclude=None,
                 scheme: str = "qdq"):
        _check_bits(wbits, "weight bits")
        if abits is not None:
            _check_bits(abits, "activation bits", low=4)
        if granularity not in ("channel", "tensor"):
            raise ValueError(f"granularity must be 'channel' or 'tensor', got {granularity!r}")
        if method not in ("rtn", "mse"):
            raise ValueError(f"method must be 'rtn' or 'mse', got {method!r}")
        if act_method not in ACT_METHODS:
            raise ValueError(f"act_method must be one of {', '.join(ACT_METHODS)}, got {act_method!r}")
        self.wbits, self.abits, self.granularity, self.method = wbits, abits, granularity, method
        self.act_method = act_method
        self._select_options(exclude_first, exclude_last, exclude)
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
        self.scheme = scheme

    @property
    def numerics(self) -> Numerics:
        return Numerics.CHANGES

    def params(self):
        return {"wbits": self.wbits, "abits": self.abits, "granularity": self.granularity, "method": self.method,
                "act_method": self.act_method, **self.selection_params(), "scheme": self.scheme}

    def check(self, ctx: PassContext) -> str | None:
        if self.abits is not None and not ctx.calibration:
            return ("calibration data for the activation ranges (PassContext(calibration=[batch, ...]), or --data "
                    "NAME on the command line)")
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        folded = self._fold_batchnorm(gm, ctx, replay=False)
        stats: Counter = Counter()
        layers, excluded = self.selected_layers(gm, stats)
        if folded:
            stats["batchnorms folded"] = folded
        info: dict = {"layers": {}, "excluded": excluded}
        with torch.no_grad():
            for name, m in layers:
                q = fake_quant_weight(m.weight, self.wbits, per_channel=self.granularity == "channel",
                                      method=self.method)
                err = float((q - m.weight).norm() / m.weight.norm().clamp(min=1e-12))
                m.weight.copy_(q)
                info["layers"][name] = {"weight_rel_error": err}
                stats["quantized weights"] += 1
        self._record(gm, [n for n, _ in layers])
        if self.abits is not None:
            quantizers = self._insert_act_quant(gm, [n for n, _ in layers])
            stats["activation quantizers"] = len(quantizers)
            self._calibrate(gm, quantizers, ctx.calibration, info)
        return PassResult(gm, bool(stats), stats, info)

    def replay(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Weights and calibrated ranges come from the file: only the activation quantizers are re-inserted."""
        stats: Counter = Counter()
        self._fold_batchnorm(gm, ctx, replay=True)
        layers, _ = self.selected_layers(gm)
        self._record(gm, [n for n, _ in layers])
        if self.abits is not None:
            stats["activation quantizers"] = len(self._insert_act_quant(gm, [n for n, _ in layers]))
        return PassResult(gm, bool(stats), stats, {"layers": {}})

    def _record(self, gm: fx.GraphModule, names: list[str]) -> None:
        """Which layers hold grid weights, and which grid: what the QDQ export needs."""
        record = sntfx_meta(gm).setdefault("quantized_weights", {})
        for name in names:
            record[name] = {"bits": self.wbits, "per_channel": self.granularity == "channel"}

    def _fold_batchnorm(self, gm: fx.GraphModule, ctx: PassContext, *, replay: bool) -> int:
        """``qdq``: fold BatchNorms into the layers first (exact), as the deployed graph has them."""
        if self.abits is None or self.scheme != "qdq":
            return 0
        from .bn_fold import FoldBatchNorm

        p = FoldBatchNorm()
        result = p.replay(gm, ctx) if replay else p.run(gm, ctx)
        return int(result.stats.get("folded", 0))

    def _quantized_operands(self, gm: fx.GraphModule, targets: list[str]) -> list[tuple[fx.Node, fx.Node]]:
        """(consumer, operand) pairs whose operand gets an activation quantizer, in graph order."""
        pairs = []
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target in targets and node.args and isinstance(node.args[0], fx.Node):
                pairs.append((node, node.args[0]))
            elif self.scheme == "qdq" and _is_tensor_add(node):
                pairs += [(node, a) for a in node.args[:2]]
        return pairs

    def _insert_act_quant(self, gm: fx.GraphModule, targets: list[str]) -> dict[str, ActQuant]:
        """Insert the quantizers; returns ``{"consumer|quantizer": ActQuant}`` (a shared module repeats)."""
        quantizers: dict[str, ActQuant] = {}
        index = sum(1 for n, _ in gm.named_children() if n.startswith("sntfx_actq_"))
        shared: dict[fx.Node, fx.Node] = {}  # qdq: one quantizer per tensor
        for consumer, src in self._quantized_operands(gm, targets):
            qnode = shared.get(src) if self.scheme == "qdq" else None
            if qnode is None:
                qname = f"sntfx_actq_{index}"
                index += 1
                gm.add_submodule(qname, ActQuant(self.abits, self.act_method))
                with gm.graph.inserting_after(src):
                    qnode = gm.graph.call_module(qname, (src,))
                qnode.meta.update({k: v for k, v in getattr(src, "meta", {}).items() if k == "tensor_meta"})
                shared[src] = qnode
            consumer.replace_input_with(src, qnode)
            label = consumer.target if consumer.op == "call_module" else consumer.name
            quantizers[f"{label}|{qnode.target}"] = gm.get_submodule(qnode.target)
        gm.recompile()
        return quantizers

    def _calibrate(self, gm, quantizers: dict[str, ActQuant], batches, info: dict) -> None:
        unique = list({id(q): q for q in quantizers.values()}.values())
        for q in unique:
            q.calibrating = True
        with torch.no_grad():
            for x in batches:
                gm(x)
        for q in unique:
            q.finish_calibration()
        # Relative error of each quantized input on the first calibration batch.
        errors: dict[str, float] = {}
        hooks = []
        modules = dict(gm.named_modules())
        for key, q in quantizers.items():
            layer = key.split("|")[0]
            if layer not in modules:
                continue  # an addition's operand: the report is per layer

            def hook(mod, args, out, layer=layer):
                x = args[0]
                errors[layer] = float((out - x).norm() / x.norm().clamp(min=1e-12))

            hooks.append(q.register_forward_hook(hook))
        try:
            with torch.no_grad():
                gm(batches[0])
        finally:
            for h in hooks:
                h.remove()
        for layer, e in errors.items():
            info["layers"].setdefault(layer, {})["input_rel_error"] = e


SCHEMES = ("qdq", "layer-inputs")
_ADDS = (operator.add, operator.iadd, torch.add)


def _is_tensor_add(node: fx.Node) -> bool:
    """``a + b`` of two computed tensors (a residual sum), not a tensor plus a constant or a parameter."""
    is_add = (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target == "add")
    if not is_add or len(node.args) < 2 or node.kwargs.get("alpha", 1) != 1:
        return False
    return all(isinstance(a, fx.Node) and a.op != "get_attr" for a in node.args[:2])
