"""Weight-distribution statistics of a folded model: the mechanism behind compression robustness.

Measured on the deployed form (every BatchNorm that can be folded into the
layer before it is folded first, on a copy), over every conv/linear weight:

* ``kurtosis``: excess kurtosis of each layer's weights, averaged over layers
  (0 for a Gaussian; heavy tails make magnitude pruning and uniform grids
  harder);
* ``crest_factor``: per output channel, ``max |w| / rms(w)``, averaged over
  channels and layers (a per-channel quantization grid spans the maximum, so
  a high crest factor leaves few levels for the bulk of the weights);
* ``zero_at_w4``: the fraction of weights that symmetric per-channel 4-bit
  round-to-nearest quantization sets to zero (``|w| < max|w_c| / 14``).
"""

from __future__ import annotations

import copy
import statistics

import torch.fx as fx

from .compress_utils import prunable_layers

__all__ = ["weight_statistics"]


def weight_statistics(gm: fx.GraphModule, *, fold_batchnorm: bool = True) -> dict[str, float]:
    """``kurtosis``, ``crest_factor`` and ``zero_at_w4`` of ``gm``'s conv/linear weights (see the module docstring)."""
    model = gm
    if fold_batchnorm:
        from .pass_base import PassContext
        from .pass_manager import PassManager
        from .passes import FoldBatchNorm

        model = PassManager([FoldBatchNorm()]).run(copy.deepcopy(gm), PassContext()).graph_module
    kurtosis, crest, zeros, total = [], [], 0, 0
    for _, layer in prunable_layers(model):
        w = layer.weight.detach().double()
        flat = w.reshape(-1)
        centred = flat - flat.mean()
        var = centred.square().mean()
        if var > 0:
            kurtosis.append(float(centred.pow(4).mean() / var.square() - 3.0))
        rows = w.reshape(w.shape[0], -1)
        amax = rows.abs().amax(dim=1)
        rms = rows.square().mean(dim=1).sqrt()
        alive = rms > 0
        crest.extend((amax[alive] / rms[alive]).tolist())
        zeros += int((rows.abs() < (amax / 14).unsqueeze(1)).sum())
        total += rows.numel()
    return {"kurtosis": statistics.fmean(kurtosis) if kurtosis else float("nan"),
            "crest_factor": statistics.fmean(crest) if crest else float("nan"),
            "zero_at_w4": zeros / total if total else float("nan")}
