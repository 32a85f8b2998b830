"""Quantization readiness: why a folded model will or will not survive low-bit weights.

For every conv/linear layer: the weight range, the outlier ratio per output
channel (``max |w| / rms(w)``; large values waste quantization levels on a
few weights), the simulated ``bits``-bit weight error (per channel and per
tensor), and the layer's *sensitivity*: the relative change of the model's
outputs when only that layer is quantized, on real inputs. Layers are ranked
by sensitivity: the first few dominate the accuracy loss.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.fx as fx

from .compress_utils import prunable_layers
from .quant import fake_quant_weight
from .tracing import compare_outputs

__all__ = ["LayerQuantReport", "quant_readiness"]


@dataclass
class LayerQuantReport:
    layer: str
    weight_min: float
    weight_max: float
    outlier_ratio_max: float  # max over channels of max|w| / rms(w)
    outlier_ratio_median: float
    error_channel: float  # relative weight error, per-channel quantization
    error_tensor: float  # relative weight error, per-tensor quantization
    sensitivity: float  # relative output change when only this layer is quantized (per channel)

    def to_dict(self):
        return asdict(self)


def quant_readiness(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], *, bits: int = 4) -> list[LayerQuantReport]:
    """Per-layer report, sorted by sensitivity (most sensitive first)."""
    gm = copy.deepcopy(gm).eval()
    with torch.no_grad():
        reference = gm(*inputs)
    rows = []
    for name, layer in prunable_layers(gm):
        w = layer.weight.detach()
        flat = w.reshape(w.shape[0], -1)
        rms = flat.square().mean(dim=1).sqrt().clamp(min=1e-12)
        ratio = flat.abs().amax(dim=1) / rms
        qc = fake_quant_weight(w, bits, per_channel=True)
        qt = fake_quant_weight(w, bits, per_channel=False)
        norm = w.norm().clamp(min=1e-12)
        with torch.no_grad():
            saved = w.clone()
            layer.weight.copy_(qc)
            sens = compare_outputs(reference, gm(*inputs))
            layer.weight.copy_(saved)
        rows.append(LayerQuantReport(name, float(w.min()), float(w.max()), float(ratio.max()), float(ratio.median()),
                                     float((qc - w).norm() / norm), float((qt - w).norm() / norm), sens))
    return sorted(rows, key=lambda r: r.sensitivity, reverse=True)
