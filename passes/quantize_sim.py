"""``quantize``: simulated post-training quantization of weights and activations.

Weights of every conv/linear layer are replaced by their quantize-dequantize
values (``wbits`` in 2..8, symmetric, per channel or per tensor, ``rtn`` or
``mse`` clipping; see :mod:`sntfx.quant`). With ``abits``, an
:class:`~sntfx.quant.ActQuant` module is inserted before each of those layers
and calibrated on ``ctx.calibration`` (batches of real inputs)::

    %y = call_module[target=conv](%x)
      ->
    %xq = call_module[target=sntfx_actq_0](%x)      # ActQuant, calibrated
    %y  = call_module[target=conv](%xq)

The result is still a torch model (its accuracy can be measured, it saves
and loads). ``info["layers"]`` reports, per layer, the relative weight
quantization error and, with activations, the relative error of the
quantized input on the calibration data.

Requires: ``folded``. Numerics: changes the function.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from sntfx.compress_utils import prunable_layers
from sntfx.pass_base import Numerics, Pass, PassContext, PassResult, Property, register_pass
from sntfx.quant import ActQuant, fake_quant_weight

__all__ = ["SimulatedQuantize"]


def _check_bits(bits, what: str, low: int = 2) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= 8:
        raise ValueError(f"{what} must be an integer from {low} to 8, got {bits!r}")


@register_pass
class SimulatedQuantize(Pass):
    """Fake-quantize weights (and optionally activations) of conv/linear layers."""

    name = "quantize"
    requires = frozenset({Property.FOLDED})
    needs_eval = True  # calibration runs the model; BatchNorms must use their running statistics

    def __init__(self, wbits: int = 8, abits: int | None = None, granularity: str = "channel", method: str = "rtn",
                 act_method: str = "minmax", exclude_first: bool = False, exclude_last: bool = False):
        _check_bits(wbits, "weight bits")
        if abits is not None:
            _check_bits(abits, "activation bits", low=4)
        if granularity not in ("channel", "tensor"):
            raise ValueError(f"granularity must be 'channel' or 'tensor', got {granularity!r}")
        if method not in ("rtn", "mse"):
            raise ValueError(f"method must be 'rtn' or 'mse', got {method!r}")
        if act_method not in ("minmax", "percentile", "mse"):
            raise ValueError(f"act_method must be minmax, percentile or mse, got {act_method!r}")
        self.wbits, self.abits, self.granularity, self.method = wbits, abits, granularity, method
        self.act_method, self.exclude_first, self.exclude_last = act_method, bool(exclude_first), bool(exclude_last)

    @property
    def numerics(self) -> Numerics:
        return Numerics.CHANGES

    def params(self):
        return {"wbits": self.wbits, "abits": self.abits, "granularity": self.granularity, "method": self.method,
                "act_method": self.act_method, "exclude_first": self.exclude_first, "exclude_last": self.exclude_last}

    def check(self, ctx: PassContext) -> str | None:
        if self.abits is not None and not ctx.calibration:
            return ("calibration data for the activation ranges (PassContext(calibration=[batch, ...]), or --data "
                    "NAME on the command line)")
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        layers = prunable_layers(gm, exclude_first=self.exclude_first, exclude_last=self.exclude_last)
        stats: Counter = Counter()
        info: dict = {"layers": {}}
        with torch.no_grad():
            for name, m in layers:
                q = fake_quant_weight(m.weight, self.wbits, per_channel=self.granularity == "channel",
                                      method=self.method)
                err = float((q - m.weight).norm() / m.weight.norm().clamp(min=1e-12))
                m.weight.copy_(q)
                info["layers"][name] = {"weight_rel_error": err}
                stats["quantized weights"] += 1
        if self.abits is not None:
            quantizers = self._insert_act_quant(gm, [n for n, _ in layers])
            stats["activation quantizers"] = len(quantizers)
            self._calibrate(gm, quantizers, ctx.calibration, info)
        return PassResult(gm, bool(stats), stats, info)

    def replay(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Weights and calibrated ranges come from the file: only the activation quantizers are re-inserted."""
        stats: Counter = Counter()
        if self.abits is not None:
            layers = prunable_layers(gm, exclude_first=self.exclude_first, exclude_last=self.exclude_last)
            stats["activation quantizers"] = len(self._insert_act_quant(gm, [n for n, _ in layers]))
        return PassResult(gm, bool(stats), stats, {"layers": {}})

    def _insert_act_quant(self, gm: fx.GraphModule, targets: list[str]) -> dict[str, ActQuant]:
        quantizers: dict[str, ActQuant] = {}
        index = sum(1 for n, _ in gm.named_children() if n.startswith("sntfx_actq_"))
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or node.target not in targets or not node.args:
                continue
            src = node.args[0]
            qname = f"sntfx_actq_{index}"
            index += 1
            gm.add_submodule(qname, ActQuant(self.abits, self.act_method))
            with gm.graph.inserting_before(node):
                qnode = gm.graph.call_module(qname, (src,))
            qnode.meta.update({k: v for k, v in getattr(src, "meta", {}).items() if k == "tensor_meta"})
            node.args = (qnode, *node.args[1:])
            quantizers[node.target + "|" + qname] = gm.get_submodule(qname)
        gm.recompile()
        return quantizers

    def _calibrate(self, gm, quantizers: dict[str, ActQuant], batches, info: dict) -> None:
        for q in quantizers.values():
            q.calibrating = True
        with torch.no_grad():
            for x in batches:
                gm(x)
        for q in quantizers.values():
            q.finish_calibration()
        # Relative error of each quantized input on the first calibration batch.
        errors: dict[str, float] = {}
        hooks = []
        for key, q in quantizers.items():
            layer = key.split("|")[0]

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
