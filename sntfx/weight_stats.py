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
  round-to-nearest quantization sets to zero (``|w| < max|w_c| / 14``);
* ``centre_max_share``: over the output channels of convolutions whose kernel
  has a centre tap (odd sizes, more than one tap), the fraction whose largest
  ``|w|`` sits at the centre tap (``1 / taps`` when no tap is special: 0.111
  for 3x3). Branch styles add their 1x1 and identity branches to the centre
  tap only; this says whether that is where a channel's quantization range
  comes from. Absent for a model without such a convolution.
"""

from __future__ import annotations

import copy
import statistics

import torch.fx as fx

from .compress_utils import prunable_layers

__all__ = ["weight_statistics"]


def weight_statistics(gm: fx.GraphModule, *, fold_batchnorm: bool = True) -> dict[str, float]:
    """``kurtosis``, ``crest_factor``, ``zero_at_w4`` and ``centre_max_share`` of ``gm``'s conv/linear weights
    (see the module docstring)."""
    model = gm
    if fold_batchnorm:
        from .pass_base import PassContext
        from .pass_manager import PassManager
        from .passes import FoldBatchNorm

        model = PassManager([FoldBatchNorm()]).run(copy.deepcopy(gm), PassContext()).graph_module
    kurtosis, crest, zeros, total = [], [], 0, 0
    at_centre: list[float] = []
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
        kernel = w.shape[2:]
        if kernel and all(k % 2 for k in kernel) and w[0, 0].numel() > 1:
            centre = w[(slice(None), slice(None), *(k // 2 for k in kernel))].abs().amax(dim=1)
            at_centre.extend((centre[alive] >= amax[alive]).double().tolist())
    stats = {"kurtosis": statistics.fmean(kurtosis) if kurtosis else float("nan"),
             "crest_factor": statistics.fmean(crest) if crest else float("nan"),
             "zero_at_w4": zeros / total if total else float("nan")}
    if at_centre:
        stats["centre_max_share"] = statistics.fmean(at_centre)
    return stats
